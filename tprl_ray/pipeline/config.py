"""Configuration of the whole pipeline and how it wires each stage's config.

A :class:`PipelineConfig` holds one section per stage, each that stage's own config class (so its
defaults are the stage's defaults), plus what the stages share: the backbone, the seed, Ray and
MLflow. :func:`stage_configs` hands every stage its section with the pipeline's paths and shared
settings; those fields are refused in a section, since the pipeline would overwrite them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from tprl_ray.config import (
    EMBEDDED_LFD,
    PAPER_BUDGETS,
    BackboneConfig,
    Command,
    PoolConfig,
    RunConfig,
    StageConfig,
    check_budgets,
    first_error,
    known_name,
)
from tprl_ray.evaluation.config import BenchmarkName, EvalConfig, VizConfig
from tprl_ray.evaluation.metrics import BENCHMARKS
from tprl_ray.precompute.config import PrecomputeConfig
from tprl_ray.pruners.registry import BASELINES, LEARNED, REFERENCES
from tprl_ray.rl.config import PAPER_PPO, PpoConfig
from tprl_ray.training.config import AutoencoderConfig, LfdConfig

SECTIONS = ("precompute", "autoencoder", "lfd", "ppo")
WIRED = {
    "data",
    "val_data",
    "out",
    "init",
    "autoencoder",
    "limit",
    "seed",
    "budgets",
    "ray_address",
    "mlflow_uri",
    "backbone",
}


class PipelineConfig(RunConfig):
    """`tprl pipeline` / `pipelines/full.py`: every stage, then the evaluation of every pruner.

    ``backbone.path`` is 'embedded' (the shipped tiny LLaVA), 'train' (train the tiny LLaVA into
    ``out/model`` first), a checkpoint directory or a hub id; the same backbone settings reach the
    precompute, the scorer and the evaluation.
    """

    out: Path = Field(Path("runs/demo"), description="output directory")
    seed: int = Field(
        0, description="benchmark seed (the shipped model was trained on seed 0), and the training seed without --seeds"
    )
    seeds: list[int] = Field(
        [],
        description="training seeds: the training stages and the evaluation run once per "
        "seed (data, model and precompute shared), report.json holds the mean "
        "and standard deviation (none: one run with seed)",
    )
    backbone: BackboneConfig = BackboneConfig()
    data: Path | None = Field(
        None,
        description="benchmark directory with train/val/test splits in the LLaVA "
        "layout (None: build the digits benchmark in out/data)",
    )
    benchmark: BenchmarkName = Field("digits", description=f"scorer of the test split: {', '.join(BENCHMARKS)}")
    budgets: list[float] = Field(PAPER_BUDGETS, description="kept fractions of the visual tokens")
    policy: Literal["train", "shipped"] = Field(
        "train",
        description="train: precompute, autoencoder, LfD and PPO in out; shipped: the LfD policy "
        "shipped for the embedded model, no training (no tprl rows)",
    )
    pruners: list[str] = Field(
        [*BASELINES, *LEARNED, *REFERENCES],
        description="pruners to compare against the full model (by default every one; oracle on digits only)",
    )
    eval_questions: int = Field(0, ge=0, description="test questions to evaluate (0: all)")
    train_questions: int = Field(
        0, ge=0, description="first N questions of the train and val splits to train on (0: all)"
    )
    precompute: PrecomputeConfig = PrecomputeConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    lfd: LfdConfig = LfdConfig()
    ppo: PpoConfig = PpoConfig()
    evaluation: PoolConfig = Field(PoolConfig(cpus=2, batch_size=64), description="the evaluation's actor pool")
    experiment: str = Field("tprl", description="MLflow experiment of the pipeline run and its stage runs")
    trajectories: int = Field(
        8, ge=0, description="test questions whose pruning steps `tprl viz` draws at the end (0: none)"
    )

    wired: ClassVar[frozenset[str]] = frozenset(WIRED)
    presets: ClassVar[dict[str, dict[str, Any]]] = {"paper": {f"ppo.{k}": v for k, v in PAPER_PPO.items()}}

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, value: list[float]) -> list[float]:
        return check_budgets(value, counts=False)

    @field_validator("pruners")
    @classmethod
    def _known_pruners(cls, names: list[str]) -> list[str]:
        return [known_name("pruner", name, [*BASELINES, *LEARNED, *REFERENCES]) for name in names]

    @model_validator(mode="after")
    def _stages_validate(self):
        for name in SECTIONS:
            section = getattr(self, name)
            wired = sorted(WIRED & section.model_fields_set)
            if name == "ppo":
                wired += [f"scorer.{k}" for k in sorted(WIRED & section.scorer.model_fields_set)]
            if wired:
                raise ValueError(f"{name}: {wired} are set by the pipeline")
        if self.policy == "shipped" and "tprl" in self.pruners:
            self.pruners = [n for n in self.pruners if n != "tprl"]
        if self.benchmark != "digits" and "oracle" in self.pruners and "pruners" not in self.model_fields_set:
            # the default list drops it; a list the user chose is refused by EvalConfig below
            self.pruners = [n for n in self.pruners if n != "oracle"]
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed")
        try:  # a wrong stage setting fails now, not hours into the run
            stage_configs(self, self.out / "data", self.out / "model")
        except ValidationError as exc:
            raise ValueError(first_error(exc)) from None
        return self


def _wired(section: StageConfig, **fields) -> StageConfig:
    """``section`` with the pipeline's ``fields``, validated again."""
    return type(section).model_validate({**section.model_dump(), **fields})


def stage_configs(
    cfg: PipelineConfig, data: Path, model_path: Path | str, seed: int | None = None
) -> dict[str, StageConfig]:
    """Each stage's config: its section with the pipeline's paths and shared settings. With a training
    ``seed`` (``--seeds``), the training stages and the evaluation write under ``out/seed-N``; the
    precompute is shared."""
    from tprl_ray.tracking import tracking_uri

    uri = tracking_uri(cfg.out, cfg.mlflow_uri)
    out = cfg.out if seed is None else cfg.out / f"seed-{seed}"
    seed = cfg.seed if seed is None else seed
    backbone = cfg.backbone.model_copy(update={"path": str(model_path)})
    common = dict(
        data=cfg.out / "precompute" / "train",
        val_data=cfg.out / "precompute" / "val",
        seed=seed,
        ray_address=cfg.ray_address,
        mlflow_uri=uri,
    )
    stages = {
        f"precompute_{split}": _wired(
            cfg.precompute,
            data=data / split,
            out=cfg.out / "precompute" / split,
            backbone=backbone,
            limit=cfg.train_questions,
            ray_address=cfg.ray_address,
        )
        for split in ("train", "val")
    }
    stages["autoencoder"] = _wired(cfg.autoencoder, out=out / "autoencoder", **common)
    stages["lfd"] = _wired(cfg.lfd, out=out / "lfd", autoencoder=out / "autoencoder", **common)
    stages["ppo"] = _wired(
        cfg.ppo,
        scorer=cfg.ppo.scorer.model_copy(update={"backbone": backbone}),
        init=out / "lfd",
        out=out / "ppo",
        budgets=cfg.budgets,
        **common,
    )
    policies = {"lfd": out / "lfd", "tprl": out / "ppo"} if cfg.policy == "train" else {}
    stages["evaluation"] = EvalConfig(
        backbone=backbone,
        data=data / "test",
        benchmark=cfg.benchmark,
        pruners=cfg.pruners,
        budgets=cfg.budgets,
        policies={k: v for k, v in policies.items() if k in cfg.pruners},
        out=out / "report.json",
        limit=cfg.eval_questions,
        pool=cfg.evaluation,
        seed=seed,
        ray_address=cfg.ray_address,
        mlflow_uri=uri,
    )
    stages["viz"] = VizConfig(
        backbone=backbone,
        data=data / "test",
        policy=out / "ppo" if cfg.policy == "train" else EMBEDDED_LFD,
        budgets=cfg.budgets,
        count=max(1, cfg.trajectories),
        out=out / "trajectories",
        mlflow_uri=uri,
    )
    return stages


COMMANDS = (
    Command(
        ("pipeline",),
        PipelineConfig,
        "tprl_ray.pipeline.run:command",
        "every stage, then every pruner evaluated (default: the embedded model and data)",
    ),
)
