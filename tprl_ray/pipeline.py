"""`tprl pipeline` / `pipelines/full.py` / `make demo`: the whole pipeline, by default on the embedded model.

Builds the digits benchmark and obtains the tiny LLaVA (the shipped checkpoint, or trains one). With
``policy: train`` (the default) it then runs every stage into ``OUT``: precompute of the train and
val splits (Ray Data), the autoencoder and the LfD policy (Ray Train), PPO against the scorer
service (RLlib, Ray Serve). Finally it evaluates the held-out test split unpruned and with every
pruner at every budget (one vision pass per batch serves every setting; ``lfd`` and ``tprl`` are the
policies just trained), prints a table with each setting's FLOPs and KV cache, writes
``OUT/report.json`` and the Pareto plot ``OUT/pareto.png``. One MLflow parent run holds every stage
as a child run (sqlite ``OUT/mlflow.db`` by default); PPO registers the pruner as a model version. A
re-run with the same ``OUT`` resumes or skips finished stages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import mlflow
from pydantic import Field, ValidationError, field_validator, model_validator

from tprl_ray.backbones.base import BackboneError
from tprl_ray.backbones.load import EMBEDDED_MODEL, load_backbone
from tprl_ray.config import StageConfig, known_name
from tprl_ray.data.digits import CATEGORIES, DigitsConfig, build_digits
from tprl_ray.data.layout import DataError, atomic_write_bytes, read_split
from tprl_ray.evaluation.accuracy import evaluate_settings
from tprl_ray.evaluation.efficiency import pruned_efficiency
from tprl_ray.evaluation.metrics import BENCHMARKS
from tprl_ray.evaluation.report import format_table, pareto_plot, report_row
from tprl_ray.models.train_tiny import TinyModelConfig, train_tiny
from tprl_ray.pruners.base import budget_tokens
from tprl_ray.pruners.registry import BASELINES, build_pruner
from tprl_ray.tracking import mlflow_run, pipeline_run, tracking_uri

PAPER_BUDGETS = [192 / 576, 144 / 576, 128 / 576]
STAGE_DEFAULTS = {"precompute": {}, "autoencoder": {"epochs": 3, "batch_size": 128, "lr": 2e-3},
                  "lfd": {"epochs": 5}, "ppo": {"iterations": 60}}
PIPELINE_KEYS = {"data", "val_data", "out", "model", "init", "autoencoder", "limit", "seed", "budgets", "ray_address",
                 "mlflow_uri"}


class PipelineConfig(StageConfig):
    """`tprl pipeline` / `pipelines/full.py`: every stage, then the evaluation of every pruner.

    The stage sections hold settings of that stage's own config (`PrecomputeConfig`,
    `AutoencoderConfig`, `LfdConfig`, `PpoConfig`) on top of the pipeline's defaults; paths, the model,
    the seed, Ray and MLflow are set by the pipeline.
    """

    out: Path = Field(Path("runs/demo"), description="output directory")
    seed: int = Field(0, description="benchmark seed (the shipped model was trained on seed 0)")
    model: str = Field("embedded", description="'embedded' (shipped checkpoint), 'train', a checkpoint "
                                                "directory or a hub id")
    data: Path | None = Field(None, description="benchmark directory with train/val/test splits in the LLaVA "
                                                "layout (None: build the digits benchmark in out/data)")
    benchmark: str = Field("digits", description=f"scorer of the test split: {', '.join(BENCHMARKS)}")
    budgets: list[float] = Field(PAPER_BUDGETS, description="kept fractions of the visual tokens")
    policy: Literal["train", "shipped"] = Field(
        "train", description="train: precompute, autoencoder, LfD and PPO in out; shipped: the LfD policy "
                             "shipped for the embedded model, no training (no tprl rows)")
    pruners: list[str] = Field([*BASELINES, "lfd", "tprl"], description="pruners to compare against the full model")
    eval_questions: int = Field(0, ge=0, description="test questions to evaluate (0: all)")
    train_questions: int = Field(0, ge=0, description="first N questions of the train and val splits to train on "
                                                       "(0: all)")
    precompute: dict[str, Any] = Field({}, description="PrecomputeConfig settings")
    autoencoder: dict[str, Any] = Field({}, description="AutoencoderConfig settings over "
                                                        f"{STAGE_DEFAULTS['autoencoder']}")
    lfd: dict[str, Any] = Field({}, description=f"LfdConfig settings over {STAGE_DEFAULTS['lfd']}")
    ppo: dict[str, Any] = Field({}, description=f"PpoConfig settings over {STAGE_DEFAULTS['ppo']}")
    batch_size: int = Field(64, ge=1, description="questions per evaluation batch")
    eval_cpus: float = Field(2, gt=0, description="CPUs (torch threads) of the evaluation task")
    eval_gpus: float | None = Field(None, ge=0, description="GPUs of the evaluation task (None: 1 if the cluster "
                                                            "has GPUs now)")
    experiment: str = Field("tprl", description="MLflow experiment of the pipeline run and its stage runs")
    ray_address: str | None = Field(None, description="None: join or start Ray; 'local': a private local Ray")
    mlflow_uri: str | None = Field(None, description="tracking URI (default: sqlite under out)")

    @field_validator("pruners")
    @classmethod
    def _known_pruners(cls, names: list[str]) -> list[str]:
        return [known_name("pruner", name, [*BASELINES, "lfd", "tprl"]) for name in names]

    @field_validator("benchmark")
    @classmethod
    def _known_benchmark(cls, name: str) -> str:
        return known_name("benchmark", name, BENCHMARKS)

    @field_validator("precompute", "autoencoder", "lfd", "ppo")
    @classmethod
    def _no_paths(cls, section: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(PIPELINE_KEYS & set(section))
        if reserved:
            raise ValueError(f"{reserved} are set by the pipeline")
        return section

    @model_validator(mode="after")
    def _stages_validate(self):
        if self.policy == "shipped" and "tprl" in self.pruners:
            self.pruners = [n for n in self.pruners if n != "tprl"]
        try:  # a wrong stage setting fails now, not hours into the run
            stage_configs(self, self.out / "data", self.out / "model")
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"{exc.title}.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        return self


def prepare_data(cfg: PipelineConfig) -> Path:
    if cfg.data is not None:
        missing = [split for split in ("train", "val", "test") if not (cfg.data / split).is_dir()]
        if missing:
            raise DataError(f"{cfg.data}: no {', '.join(missing)} split(s)")
        print(f"[pipeline] data: {cfg.data}")
        return cfg.data
    data_cfg = DigitsConfig(out=cfg.out / "data", seed=cfg.seed)
    meta = data_cfg.out / "meta.json"
    if meta.is_file() and json.loads(meta.read_text())["config"] == json.loads(data_cfg.model_dump_json()):
        print(f"[pipeline] data: reusing {data_cfg.out}")
    else:
        print(f"[pipeline] data: building {data_cfg.out}")
        build_digits(data_cfg)
    return data_cfg.out


def prepare_model(cfg: PipelineConfig, data: Path) -> Path:
    if cfg.model == "train":
        model_cfg = TinyModelConfig(data=data, out=cfg.out / "model", seed=cfg.seed)
        print(f"[pipeline] model: training {model_cfg.out}")
        train_tiny(model_cfg)
        return model_cfg.out
    path = EMBEDDED_MODEL if cfg.model == "embedded" else Path(cfg.model)
    card = path / "tprl_model_card.json"
    if card.is_file() and (data / "meta.json").is_file():
        trained_on = json.loads(card.read_text())["benchmark"]["test_pool_fingerprint"]
        if trained_on != json.loads((data / "meta.json").read_text())["test_pool_fingerprint"]:
            raise BackboneError(f"{path} was trained on a benchmark with another digit split "
                                f"(seed); its test digits would leak. Use --model train.")
    print(f"[pipeline] model: {path}")
    return path


def stage_configs(cfg: PipelineConfig, data: Path, model_path: Path) -> dict[str, StageConfig]:
    """Each stage's config: the pipeline's paths and shared settings over the stage's section."""
    from tprl_ray.precompute.job import PrecomputeConfig
    from tprl_ray.rl.train import PpoConfig
    from tprl_ray.training.autoencoder import AutoencoderConfig
    from tprl_ray.training.lfd import LfdConfig

    out, uri = cfg.out, tracking_uri(cfg.out, cfg.mlflow_uri)
    section = {name: {**STAGE_DEFAULTS[name], **getattr(cfg, name)} for name in STAGE_DEFAULTS}
    precompute = {split: PrecomputeConfig(**section["precompute"], data=data / split, out=out / "precompute" / split,
                                          model=str(model_path), limit=cfg.train_questions,
                                          ray_address=cfg.ray_address) for split in ("train", "val")}
    common = dict(data=out / "precompute" / "train", val_data=out / "precompute" / "val", seed=cfg.seed,
                  ray_address=cfg.ray_address, mlflow_uri=uri)
    scorer = {**section["ppo"].get("scorer", {}), "model": str(model_path)}
    return {
        "precompute_train": precompute["train"], "precompute_val": precompute["val"],
        "autoencoder": AutoencoderConfig(**section["autoencoder"], out=out / "autoencoder", **common),
        "lfd": LfdConfig(**section["lfd"], out=out / "lfd", autoencoder=out / "autoencoder", **common),
        "ppo": PpoConfig(**{**section["ppo"], "scorer": scorer}, init=out / "lfd", out=out / "ppo",
                         budgets=cfg.budgets, **common),
    }


def train_policies(cfg: PipelineConfig, data: Path, model_path: Path) -> dict[str, Path]:
    """Precompute, autoencoder, LfD and PPO into ``cfg.out``; the ``lfd`` and ``tprl`` policy directories."""
    from tprl_ray.precompute.job import run_precompute
    from tprl_ray.rl.train import train_ppo
    from tprl_ray.training.autoencoder import train_autoencoder
    from tprl_ray.training.lfd import train_lfd

    stages = stage_configs(cfg, data, model_path)
    for split in ("train", "val"):
        print(f"[pipeline] precompute: {split}")
        run_precompute(stages[f"precompute_{split}"])
    print("[pipeline] autoencoder (Ray Train)")
    train_autoencoder(stages["autoencoder"])
    print("[pipeline] LfD policy (Ray Train)")
    train_lfd(stages["lfd"])
    print("[pipeline] PPO (RLlib, Ray Serve scorer)")
    train_ppo(stages["ppo"])
    return {"lfd": stages["lfd"].out, "tprl": stages["ppo"].out}


def evaluate_pruners(cfg: PipelineConfig, data: Path, model_path: Path, policies: dict[str, Path]) -> dict:
    """The test split unpruned and with every pruner at every budget (one vision pass per batch serves
    every setting): the report, rows with accuracy, FLOPs and KV cache. Runs as a Ray task."""
    backbone = load_backbone(model_path)
    samples = read_split(data / "test", categories=CATEGORIES if cfg.benchmark == "digits" else None)
    if cfg.eval_questions:
        samples = samples[: cfg.eval_questions]
    pruners = {name: build_pruner(name, cfg.seed, policies.get(name)) for name in cfg.pruners}
    settings = [("none_100", build_pruner("none"), 1.0)] + [
        (f"{name}_{round(budget * 100)}", pruner, budget) for name, pruner in pruners.items() for budget in cfg.budgets]
    results = evaluate_settings(backbone, data / "test", samples, settings, cfg.benchmark, batch_size=cfg.batch_size,
                                progress=True)
    base = results["none_100"]
    full_tokens = round(base["avg_tokens"])
    text_tokens = round(sum(backbone.text_tokens(s.text) for s in samples) / len(samples))
    rows = []
    for label, pruner, budget in settings:
        result = results[label]
        kept = budget_tokens(budget, full_tokens)
        cost = pruned_efficiency(backbone.model.config, pruner, full_tokens, kept, text_tokens)
        rows.append({"label": label} | report_row(pruner.name, budget, result, base["accuracy"],
                                                  {"flops": cost.flops, "kv_cache_mb": cost.kv_cache_bytes / 1e6}))
    return {"benchmark": cfg.benchmark, "model": str(model_path), "text_tokens": text_tokens, "rows": rows}


def evaluate_remotely(cfg: PipelineConfig, data: Path, model_path: Path, policies: dict[str, Path]) -> dict:
    """:func:`evaluate_pruners` on a Ray worker (a GPU node on a cluster); each row logged to the active run."""
    import ray

    from tprl_ray.ray_setup import gpus_per_actor, init_ray

    init_ray(cfg.ray_address)
    task = ray.remote(num_cpus=cfg.eval_cpus, num_gpus=gpus_per_actor(cfg.eval_gpus))(evaluate_pruners)
    print(f"[pipeline] evaluation: {len(cfg.pruners)} pruner(s) x {len(cfg.budgets)} budget(s) on a Ray worker")
    report = ray.get(task.remote(cfg, data, model_path, policies))
    for row in report["rows"]:
        label = row.pop("label")
        print(f"[pipeline] {row['pruner']:>9} @ {row['budget']:.3f}: accuracy {row['accuracy']:.3f}")
        mlflow.log_metrics({f"{label}.{key}": row[key] for key in ("accuracy", "relative", "avg_tokens", "flops")})
    return report


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Every stage as a child run of one MLflow pipeline run; writes ``report.json`` and ``pareto.png``."""
    with pipeline_run(cfg.out, cfg.experiment, "pipeline", cfg.mlflow_uri, params=cfg.flat()):
        data = prepare_data(cfg)
        model_path = prepare_model(cfg, data)
        policies = train_policies(cfg, data, model_path) if cfg.policy == "train" else {}
        with mlflow_run(cfg.out, cfg.experiment, "evaluation", cfg.mlflow_uri):
            report = evaluate_remotely(cfg, data, model_path, policies)
            atomic_write_bytes(cfg.out / "report.json", json.dumps(report, indent=2).encode())
            pareto_plot(report, cfg.out / "pareto.png")
            mlflow.log_artifact(str(cfg.out / "report.json"))
            mlflow.log_artifact(str(cfg.out / "pareto.png"))
    print(format_table(report))
    print(f"[pipeline] wrote {cfg.out / 'report.json'} and {cfg.out / 'pareto.png'}; "
          f"MLflow store {tracking_uri(cfg.out, cfg.mlflow_uri)}, experiment {cfg.experiment!r}")
    return report
