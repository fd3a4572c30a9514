"""The serving application for Ray Serve's own tools: `serve run` and `serve deploy`.

    serve run pipelines.serve:app config=serve.yaml budget=0.25
    # or, in a Serve config file:  import_path: pipelines.serve:app  args: {config: serve.yaml}

Arguments are `ServeConfig` fields (dotted for nested ones) plus `config`, a YAML file of them; the
same configuration as `tprl serve --config`. Serve's own config file sets the HTTP host and port here.
"""

from tprl_ray.service.app import build_app, check_config
from tprl_ray.service.config import ServeConfig


def app(args: dict):
    """The bound application of the `ServeConfig` that ``args`` describe."""
    args = dict(args)
    cfg = ServeConfig.load(args.pop("config", None), overrides=args)
    check_config(cfg)
    return build_app(cfg)
