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
