"""A learned pruner as an MLflow pyfunc model: pre-projector features and a query embedding in, keep
probabilities out.

``mlflow.pyfunc.load_model("models:/tprl-pruner/1").predict({"features": f, "query": q})`` with
``f`` ``[B, N, d_v]`` (or ``[N, d_v]``) and ``q`` ``[B, d_q]`` (or ``[d_q]``) gives ``[B, N]`` keep
probabilities, one policy pass per sample with every token present. The token grid is square unless
the ``rows`` and ``cols`` params say otherwise. The model's ``pruner`` artifact is the pruner
directory (policy and autoencoder exports); :func:`pruner_directory` gives it to ``tprl serve``
(downloaded, not loaded).
It is logged as code (:mod:`tprl_ray.pruners.pyfunc_model`), not pickled; loading needs ``tprl-ray``
installed.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch

ARTIFACT = "pruner"


class PrunerModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper of the pruner in the ``pruner`` artifact (``tprl`` if PPO-trained, else ``lfd``)."""

    def load_context(self, context) -> None:
        import json

        from tprl_ray.pruners.lfd import LearnedPruner, TprlPruner

        self.directory = Path(context.artifacts[ARTIFACT])
        ppo_trained = "regime" in json.loads((self.directory / "policy.json").read_text())
        self.pruner = (TprlPruner if ppo_trained else LearnedPruner)(self.directory)

    def predict(self, context, model_input, params=None):
        features = np.asarray(model_input["features"], dtype=np.float32)
        query = np.asarray(model_input["query"], dtype=np.float32)
        if features.ndim == 2:
            features, query = features[None], query.reshape(1, -1)
        if features.ndim != 3 or query.shape != (features.shape[0], query.shape[-1]):
            raise ValueError(f"features must be [B, N, d_v] and query [B, d_q]; got {features.shape} and {query.shape}")
        n = features.shape[1]
        rows, cols = int((params or {}).get("rows", 0)), int((params or {}).get("cols", 0))
        if not rows * cols:
            rows = cols = math.isqrt(n)
        if rows * cols != n:
            raise ValueError(f"{n} tokens do not fill a {rows}x{cols} grid (pass the rows and cols params)")
        return np.stack(
            [
                torch.sigmoid(self.pruner.keep_logits(torch.from_numpy(f), torch.from_numpy(q), (rows, cols))).numpy()
                for f, q in zip(features, query)
            ]
        )


def signature(d_v: int, d_query: int):
    """The pyfunc signature: tensor inputs ``features`` and ``query``, ``[B, N]`` probabilities, grid params."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, -1, d_v), "features"),
                TensorSpec(np.dtype(np.float32), (-1, d_query), "query"),
            ]
        ),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
        params=ParamSchema([ParamSpec("rows", "long", 0), ParamSpec("cols", "long", 0)]),
    )


def log_pruner(directory: Path):
    """Log the pruner in ``directory`` as the active run's pyfunc model ``pruner``; its ``ModelInfo``."""
    import json

    from tprl_ray.pruners import pyfunc_model

    dims = {name: json.loads((directory / f"{name}.json").read_text())["dims"] for name in ("autoencoder", "policy")}
    return mlflow.pyfunc.log_model(
        name=ARTIFACT,
        python_model=pyfunc_model.__file__,
        artifacts={ARTIFACT: str(directory)},
        signature=signature(dims["autoencoder"]["d_v"], dims["policy"]["d_query"]),
        pip_requirements=["tprl-ray", "torch", "safetensors", "numpy"],
    )


def pruner_directory(uri: str) -> Path:
    """The local pruner directory of the pyfunc model at ``uri`` (``models:/NAME/VERSION``, an alias
    ``models:/NAME@ALIAS`` or ``runs:/...``): downloaded and read from its ``MLmodel`` file, without
    running the model's code (a registry's content is data to ``tprl serve``)."""
    import yaml
    from mlflow.exceptions import MlflowException

    try:
        local = Path(mlflow.artifacts.download_artifacts(uri))
    except (MlflowException, OSError) as exc:
        raise ValueError(f"{uri}: not a downloadable model ({str(exc).splitlines()[0]})") from None
    try:
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        directory = local / flavor["artifacts"][ARTIFACT]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        raise ValueError(f"{uri}: not a tprl pruner model (no {ARTIFACT!r} artifact in its MLmodel)") from None
    if not (directory / "policy.json").is_file():
        raise ValueError(f"{uri}: its {ARTIFACT!r} artifact holds no policy export")
    return directory
