import pytest

from tprl_ray.cli import build_parser
from tprl_ray.config import ConfigError, config_from_args
from tprl_ray.data.digits import DigitsConfig
from tprl_ray.models.train_tiny import TinyModelConfig


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "digits.yaml"
    path.write_text("seed: 5\nsplit_sizes: {train: 7, test: 3}\n")
    cfg = DigitsConfig.load(path, {"seed": 9})
    assert cfg.seed == 9 and cfg.split_sizes == {"train": 7, "test": 3}


def test_nested_override_and_round_trip(tmp_path):
    cfg = TinyModelConfig.load(None, {"size.text_layers": 2, "lr": 0.01})
    assert cfg.size.text_layers == 2 and cfg.lr == 0.01
    cfg.to_yaml(tmp_path / "m.yaml")
    assert TinyModelConfig.load(tmp_path / "m.yaml") == cfg
    assert cfg.flat()["size.text_layers"] == 2


@pytest.mark.parametrize("text, fragment", [
    ("seeed: 1\n", "seeed"),
    ("seed: [1, 2]\n", "seed"),
    ("split_sizes: {training: 3}\n", "unknown split"),
    ("- a\n- b\n", "mapping"),
])
def test_bad_config_names_the_culprit(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment) as info:
        DigitsConfig.load(path)
    assert str(path) in str(info.value)


def test_cli_flags_and_set_build_the_same_object(tmp_path):
    args = build_parser().parse_args(
        ["model", "tiny", "--data", str(tmp_path), "--tune-steps", "3", "--set", "size.vision_layers=2"])
    cfg = config_from_args(args, args._cls)
    assert cfg == TinyModelConfig.load(None, {"data": str(tmp_path), "tune_steps": 3, "size.vision_layers": 2})


def test_pipeline_sections_are_the_stage_configs(tmp_path):
    """A pipeline file's stage sections become each stage's own config; paths stay the pipeline's."""
    from tprl_ray.pipeline import PipelineConfig, stage_configs

    path = tmp_path / "full.yaml"
    path.write_text("out: /data/run\nlfd: {epochs: 2}\nppo: {env_runners: 4, scorer: {resources: {scorer_slot: 1}}}\n")
    cfg = PipelineConfig.load(path, {"ppo.iterations": 7, "autoencoder.latent": 32})
    stages = stage_configs(cfg, tmp_path / "data", tmp_path / "model")
    assert stages["lfd"].epochs == 2 and stages["autoencoder"].epochs == 3 and stages["autoencoder"].latent == 32
    ppo = stages["ppo"]
    assert (ppo.iterations, ppo.env_runners, ppo.scorer.resources) == (7, 4, {"scorer_slot": 1})
    assert ppo.scorer.model == str(tmp_path / "model") and ppo.init == ppo.out.parent / "lfd"
    assert stages["precompute_val"].data == tmp_path / "data" / "val"
    with pytest.raises(ConfigError, match=r"LfdConfig.epochz: Extra inputs"):
        PipelineConfig.load(path, {"lfd.epochz": 1})
    with pytest.raises(ConfigError, match=r"\['out'\] are set by the pipeline"):
        PipelineConfig.load(path, {"ppo.out": "/elsewhere"})


def test_the_shipped_cluster_pipeline_config_loads():
    from pathlib import Path

    from tprl_ray.pipeline import PipelineConfig

    cfg = PipelineConfig.load(Path(__file__).parent.parent / "cluster" / "configs" / "full.yaml")
    assert cfg.model == "llava-hf/llava-1.5-7b-hf" and cfg.ppo["scorer"]["resources"] == {"scorer_slot": 1}
