import pytest

from tprl_ray.cli import build_parser
from tprl_ray.config import ConfigError, config_from_args
from tprl_ray.data.config import DigitsConfig
from tprl_ray.models.config import TinyModelConfig


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


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("seeed: 1\n", "seeed"),
        ("seed: [1, 2]\n", "seed"),
        ("split_sizes: {training: 3}\n", "unknown split"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_bad_config_names_the_culprit(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment) as info:
        DigitsConfig.load(path)
    assert str(path) in str(info.value)


def test_cli_flags_and_set_build_the_same_object(tmp_path):
    args = build_parser().parse_args(
        ["model", "tiny", "--data", str(tmp_path), "--tune-steps", "3", "--set", "size.vision_layers=2"]
    )
    cfg = config_from_args(args, args._command.config)
    assert cfg == TinyModelConfig.load(None, {"data": str(tmp_path), "tune_steps": 3, "size.vision_layers": 2})


def test_pipeline_sections_are_the_stage_configs(tmp_path):
    """A pipeline file's stage sections become each stage's own config; paths stay the pipeline's."""
    from tprl_ray.pipeline.config import PipelineConfig, stage_configs

    path = tmp_path / "full.yaml"
    path.write_text("out: /data/run\nlfd: {epochs: 2}\nppo: {env_runners: 4, scorer: {resources: {scorer_slot: 1}}}\n")
    cfg = PipelineConfig.load(path, {"ppo.iterations": 7, "autoencoder.latent": 32})
    stages = stage_configs(cfg, tmp_path / "data", tmp_path / "model")
    assert stages["lfd"].epochs == 2 and stages["autoencoder"].epochs == 3 and stages["autoencoder"].latent == 32
    ppo = stages["ppo"]
    assert (ppo.iterations, ppo.env_runners, ppo.scorer.resources) == (7, 4, {"scorer_slot": 1})
    assert ppo.scorer.backbone.path == str(tmp_path / "model") and ppo.init == ppo.out.parent / "lfd"
    assert stages["precompute_val"].data == tmp_path / "data" / "val"
    with pytest.raises(ConfigError, match=r"PipelineConfig.lfd.epochz: Extra inputs"):
        PipelineConfig.load(path, {"lfd.epochz": 1})
    with pytest.raises(ConfigError, match=r"ppo: \['out'\] are set by the pipeline"):
        PipelineConfig.load(path, {"ppo.out": "/elsewhere"})
    with pytest.raises(ConfigError, match=r"ppo: \['scorer.backbone'\] are set by the pipeline"):
        PipelineConfig.load(path, {"ppo.scorer.backbone.dtype": "float16"})


def test_one_backbone_reaches_precompute_scorer_and_evaluation(tmp_path):
    """The pipeline's backbone section is the object every model-loading stage gets (path: the model)."""
    from tprl_ray.pipeline.config import PipelineConfig, stage_configs

    cfg = PipelineConfig.load(None, {"backbone.dtype": "bfloat16", "backbone.pad_to_square": False})
    stages = stage_configs(cfg, tmp_path / "data", tmp_path / "model")
    expected = cfg.backbone.model_copy(update={"path": str(tmp_path / "model")})
    assert stages["precompute_train"].backbone == stages["ppo"].scorer.backbone == expected
    assert stages["evaluation"].backbone == expected


def test_pipeline_defaults_are_the_stage_defaults():
    from tprl_ray.pipeline.config import PipelineConfig
    from tprl_ray.rl.config import PpoConfig
    from tprl_ray.training.config import AutoencoderConfig, LfdConfig

    cfg = PipelineConfig()
    assert cfg.ppo == PpoConfig() and cfg.lfd == LfdConfig() and cfg.autoencoder == AutoencoderConfig()
    assert (PpoConfig().iterations, LfdConfig().epochs, AutoencoderConfig().epochs) == (60, 5, 3)


def test_nested_fields_get_dotted_flags_in_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    text = capsys.readouterr().out
    assert "--backbone.dtype" in text and "--pool.batch-size" in text and "--pruners" in text
    args = build_parser().parse_args(
        [
            "eval",
            "--backbone.dtype",
            "float16",
            "--pruners",
            "random,vispruner",
            "--budgets",
            "0.25,0.5",
            "--policies",
            "lfd=/p",
        ]
    )
    cfg = config_from_args(args, args._command.config)
    assert (cfg.backbone.dtype, cfg.pruners, cfg.budgets) == ("float16", ["random", "vispruner"], [0.25, 0.5])
    assert str(cfg.policies["lfd"]) == "/p"


def test_the_pipeline_hides_the_flags_it_wires(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pipeline", "--help"])
    text = capsys.readouterr().out
    assert "--ppo.iterations" in text and "--ppo.scorer.pool.size" in text and "--backbone.path" in text
    assert "--ppo.out" not in text and "--ppo.scorer.backbone" not in text and "--precompute.data" not in text


def test_the_shipped_cluster_pipeline_config_loads():
    from pathlib import Path

    from tprl_ray.pipeline.config import PipelineConfig

    cfg = PipelineConfig.load(Path(__file__).parent.parent / "cluster" / "configs" / "full.yaml")
    assert cfg.backbone.path == "llava-hf/llava-1.5-7b-hf" and cfg.backbone.dtype == "float16"
    assert cfg.ppo.scorer.resources == {"scorer_slot": 1} and cfg.ppo.scorer.pool.size == 2 and cfg.ppo.env_runners == 4


def test_the_paper_recipe_trains_on_a_mixture_and_evaluates_seven_benchmarks():
    from pathlib import Path

    from tprl_ray.pipeline.config import PipelineConfig, stage_configs

    cfg = PipelineConfig.load(Path(__file__).parent.parent / "cluster" / "configs" / "paper-llava-1.5-7b.yaml")
    names = ["gqa", "mmbench", "mme", "pope", "seed", "scienceqa", "vqav2"]
    assert [e.name for e in cfg.suite] == names and [e.scorer for e in cfg.suite] == names
    stages = stage_configs(cfg, cfg.out / "data", "llava-hf/llava-1.5-7b-hf")
    assert [p.name for p in stages["precompute_train"].data] == ["vqav2", "gqa", "scienceqa"]
    assert [p.name for p in stages["precompute_val"].data] == ["gqa", "scienceqa"]
    assert stages["ppo"].env.weights == {"vqav2": 1.0, "gqa": 1.0, "scienceqa": 0.5}
    assert stages["evaluation"].budgets == [0.3333333, 0.25, 0.2222222] and "oracle" not in cfg.pruners


def test_the_oracle_row_is_for_the_digits_benchmark_only():
    from tprl_ray.pipeline.config import PipelineConfig

    assert "oracle" in PipelineConfig().pruners and "oracle" not in PipelineConfig(benchmark="gqa").pruners
    with pytest.raises(ConfigError, match="'oracle' needs the digits benchmark"):
        PipelineConfig.load(None, {"benchmark": "gqa", "pruners": ["vispruner", "oracle"]})


def test_a_preset_sits_under_the_config_file_and_the_flags(tmp_path):
    from tprl_ray.pipeline.config import PipelineConfig
    from tprl_ray.rl.config import PAPER_PPO, PpoConfig

    paper = PpoConfig.load(preset="paper")
    assert {k: paper.flat()[k] for k in PAPER_PPO} == PAPER_PPO
    assert paper.flat() != PpoConfig().flat()  # the defaults differ from the paper's recipe somewhere
    path = tmp_path / "ppo.yaml"
    path.write_text("env: {t_max: 2}\nlr: 0.001\n")
    args = build_parser().parse_args(["train", "ppo", "--preset", "paper", "--config", str(path), "--env.beta", "0.3"])
    cfg = config_from_args(args, args._command.config)
    assert (cfg.env.regime, cfg.env.reward, cfg.env.t_max, cfg.lr, cfg.env.beta) == ("discount", "batch", 2, 0.001, 0.3)
    pipeline = PipelineConfig.load(preset="paper")
    assert pipeline.ppo == PpoConfig.load(preset="paper") and pipeline.lfd.positions is False
    with pytest.raises(ConfigError, match="unknown preset 'fast' \\(available: paper\\)"):
        PpoConfig.load(preset="fast")
    with pytest.raises(SystemExit):  # the choices are listed by argparse
        build_parser().parse_args(["train", "ppo", "--preset", "fast"])
