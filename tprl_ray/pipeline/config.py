"""Configuration of the whole pipeline and how it wires each stage's config.

A :class:`PipelineConfig` holds one section per stage, each that stage's own config class (so its
defaults are the stage's defaults), plus what the stages share: the backbone, the seed, Ray and
MLflow. :func:`stage_configs` hands every stage its section with the pipeline's paths and shared
settings; those fields are refused in a section, since the pipeline would overwrite them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from tprl_ray.config import (
    EMBEDDED_LFD,
    PAPER_BUDGETS,
    BackboneConfig,
    Command,
    PoolConfig,
    RunConfig,
    StageConfig,
    check_budgets,
    deep_merge,
    first_error,
    known_name,
    set_dotted,
)
from tprl_ray.data.config import DataPart, check_parts
from tprl_ray.evaluation.config import BenchmarkName, EvalConfig, SuiteEntry, VizConfig, check_suite, scorers
from tprl_ray.evaluation.metrics import BENCHMARKS
from tprl_ray.precompute.config import PrecomputeConfig
from tprl_ray.pruners.registry import BASELINES, LEARNED, REFERENCES
from tprl_ray.rl.config import PAPER_PPO, PpoConfig
from tprl_ray.training.config import AutoencoderConfig, LfdConfig, LlmConfig

SECTIONS = ("precompute", "autoencoder", "lfd", "ppo", "llm")
WIRED = {
    "data",
    "val_data",
    "out",
    "init",
    "autoencoder",
    "policy",
    "pruner",
    "limit",
    "seed",
    "budgets",
    "ray_address",
    "mlflow_uri",
    "backbone",
}


class PipelineConfig(RunConfig):
    """`tprl pipeline` / `pipelines/full.py`: every stage, then the evaluation of every pruner.

    ``backbone.path`` (or its shorthand ``model``) is 'embedded' (the shipped tiny LLaVA),
    'embedded-qwen' (the shipped tiny Qwen2.5-VL, on digits boards of two sizes), 'train' (train the
    tiny LLaVA into ``out/model`` first), a checkpoint directory or a hub id; the same backbone
    settings reach the precompute, the scorer and the evaluation.
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
    model: str | None = Field(
        None,
        description="shorthand for backbone.path: embedded (the tiny LLaVA), embedded-qwen (the tiny "
        "Qwen2.5-VL; the digits built with its two board sizes), train, a directory or a hub id",
    )
    backbone: BackboneConfig = BackboneConfig()
    data: Path | None = Field(
        None,
        description="benchmark directory with train/val/test splits in the LLaVA "
        "layout (None: build the digits benchmark in out/data)",
    )
    benchmark: BenchmarkName = Field("digits", description=f"scorer of the test split: {', '.join(BENCHMARKS)}")
    mixture: list[DataPart] = Field(
        [],
        description="train on several named splits instead of data/train and data/val: a list of "
        "{name, path, weight, val}; the environment draws each part by its weight",
    )
    suite: Path | list[SuiteEntry] | None = Field(
        None,
        description="evaluate a suite (a YAML file or a list of {name, benchmark, data, limit}) instead of "
        "data/test: report.json and report.md hold the Table 1 report",
    )
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
    finetune: bool = Field(
        False,
        description="then fine-tune the language model on inputs the pruner pruned (tprl train llm) and "
        "evaluate the fine-tuned model with that pruner beside the frozen one",
    )
    llm: LlmConfig = Field(LlmConfig(), description="the fine-tuning stage (with finetune)")
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

    @field_validator("mixture")
    @classmethod
    def _mixture(cls, value: list[DataPart]) -> list[DataPart]:
        return check_parts(value)

    @field_validator("suite")
    @classmethod
    def _suite(cls, value):
        return check_suite(value)

    @field_validator("pruners")
    @classmethod
    def _known_pruners(cls, names: list[str]) -> list[str]:
        return [known_name("pruner", name, [*BASELINES, *LEARNED, *REFERENCES]) for name in names]

    @model_validator(mode="before")
    @classmethod
    def _model_is_backbone_path(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("model") is None:
            return data
        backbone = data.get("backbone") or {}
        backbone = backbone.model_dump(exclude_unset=True) if isinstance(backbone, BackboneConfig) else dict(backbone)
        if backbone.get("path", data["model"]) != data["model"]:
            raise ValueError(f"model {data['model']!r} and backbone.path {backbone['path']!r} name two models")
        return {**data, "backbone": {**backbone, "path": data["model"]}}

    @model_validator(mode="after")
    def _stages_validate(self):
        if self.policy == "shipped" and self.backbone.path == "embedded-qwen":
            raise ValueError("the shipped LfD policy is the tiny LLaVA's: use policy: train with embedded-qwen")
        for name in SECTIONS:
            section = getattr(self, name)
            wired = sorted(WIRED & section.model_fields_set)
            if name == "ppo":
                wired += [f"scorer.{k}" for k in sorted(WIRED & section.scorer.model_fields_set)]
            if wired:
                raise ValueError(f"{name}: {wired} are set by the pipeline")
        if self.finetune and self.policy == "shipped":
            raise ValueError("finetune needs policy: train (the fine-tuning reads the precompute the training writes)")
        if self.finetune and self.suite:
            raise ValueError("finetune evaluates one test split: use it without suite")
        if self.mixture and self.suite and self.data is None and self.backbone.path == "train":
            raise ValueError("backbone.path train trains the tiny model on data: give data, or a model path")
        if self.mixture and "weights" in self.ppo.env.model_fields_set:
            raise ValueError("ppo.env.weights are the mixture's weights (set them on its parts)")
        if self.policy == "shipped" and "tprl" in self.pruners:
            self.pruners = [n for n in self.pruners if n != "tprl"]
        digits = scorers(self.suite, self.benchmark) == {"digits"}
        if not digits and "oracle" in self.pruners and "pruners" not in self.model_fields_set:
            # the default list drops it; a list the user chose is refused by EvalConfig below
            self.pruners = [n for n in self.pruners if n != "oracle"]
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed")
        try:  # a wrong stage setting fails now, not hours into the run
            stage_configs(self, self.out / "data", self.out / "model")
        except ValidationError as exc:
            raise ValueError(first_error(exc)) from None
        return self


def training_sources(cfg: PipelineConfig, data: Path) -> dict[str, Path | list[DataPart]]:
    """What the precompute reads per split: ``data/train`` and ``data/val``, or the mixture's parts
    and (if any part has one) their validation splits."""
    if not cfg.mixture:
        return {"train": data / "train", "val": data / "val"}
    vals = [p.model_copy(update={"path": p.val, "val": None}) for p in cfg.mixture if p.val is not None]
    return {"train": list(cfg.mixture), **({"val": vals} if vals else {})}


def with_fields(section: StageConfig, **fields) -> StageConfig:
    """``section`` with the pipeline's ``fields``, validated again."""
    return type(section).model_validate({**section.model_dump(), **fields})


def stage_configs(
    cfg: PipelineConfig, data: Path, model_path: Path | str, seed: int | None = None, runs: Path | None = None
) -> dict[str, StageConfig]:
    """Each stage's config: its section with the pipeline's paths and shared settings. With a training
    ``seed`` (``--seeds``), the training stages and the evaluation write under ``out/seed-N`` (``runs/seed-N``
    if given); the precompute is shared."""
    from tprl_ray.tracking import tracking_uri

    uri = tracking_uri(cfg.out, cfg.mlflow_uri)
    out = cfg.out if seed is None else (runs or cfg.out) / f"seed-{seed}"
    seed = cfg.seed if seed is None else seed
    backbone = cfg.backbone.model_copy(update={"path": str(model_path)})
    sources = training_sources(cfg, data)
    common = dict(
        data=cfg.out / "precompute" / "train",
        val_data=cfg.out / "precompute" / "val" if "val" in sources else None,
        seed=seed,
        ray_address=cfg.ray_address,
        mlflow_uri=uri,
    )
    stages = {
        f"precompute_{split}": with_fields(
            cfg.precompute,
            data=source,
            out=cfg.out / "precompute" / split,
            backbone=backbone,
            limit=cfg.train_questions,
            ray_address=cfg.ray_address,
        )
        for split, source in sources.items()
    }
    stages["autoencoder"] = with_fields(cfg.autoencoder, out=out / "autoencoder", **common)
    stages["lfd"] = with_fields(cfg.lfd, out=out / "lfd", autoencoder=out / "autoencoder", **common)
    weights = {p.name: p.weight for p in cfg.mixture} if len(cfg.mixture) > 1 else {}
    stages["ppo"] = with_fields(
        cfg.ppo,
        env=cfg.ppo.env.model_copy(update={"weights": weights}) if weights else cfg.ppo.env,
        scorer=cfg.ppo.scorer.model_copy(update={"backbone": backbone}),
        init=out / "lfd",
        out=out / "ppo",
        budgets=cfg.budgets,
        **common,
    )
    policies = {"lfd": out / "lfd", "tprl": out / "ppo"} if cfg.policy == "train" else {}
    test = cfg.suite[0].data if cfg.suite else data / "test"
    stages["evaluation"] = EvalConfig(
        backbone=backbone,
        data=test,
        suite=cfg.suite,
        benchmark=cfg.benchmark,
        pruners=cfg.pruners,
        budgets=cfg.budgets,
        policies={k: v for k, v in policies.items() if k in cfg.pruners},
        out=out / "suite" / "table1.json" if cfg.suite else out / "report.json",
        limit=cfg.eval_questions,
        pool=cfg.evaluation,
        seed=seed,
        ray_address=cfg.ray_address,
        mlflow_uri=uri,
    )
    pruner, policy = ("tprl", out / "ppo") if cfg.policy == "train" else ("lfd", EMBEDDED_LFD)
    stages["llm"] = with_fields(cfg.llm, backbone=backbone, pruner=pruner, policy=policy, out=out / "llm", **common)
    tuned = {"adapter": out / "llm" / "adapter"} if cfg.llm.method == "lora" else {"path": str(out / "llm" / "model")}
    stages["evaluation_finetuned"] = with_fields(
        stages["evaluation"],
        backbone=backbone.model_copy(update=tuned),
        pruners=[pruner],
        policies={pruner: policy},
        out=out / "finetuned" / "report.json",
        run_name="evaluation-finetuned",
    )
    stages["viz"] = VizConfig(
        backbone=backbone,
        data=test,
        policy=out / "ppo" if cfg.policy == "train" else EMBEDDED_LFD,
        budgets=cfg.budgets,
        count=max(1, cfg.trajectories),
        out=out / "trajectories",
        mlflow_uri=uri,
    )
    return stages


ABLATIONS = ("method", "t_max", "architecture", "latent", "optimiser")
# fields of the pipeline section that tprl ablate sets itself
ABLATE_WIRED = ("out", "seeds", "pruners", "trajectories", "finetune", "llm", "ray_address", "mlflow_uri")
SUITES = {"paper": ABLATIONS}
# `--quick`: what it sets where the command line or the file does not (about an hour on 2 CPU cores)
QUICK: dict[str, Any] = {
    "seeds": [0, 1],
    "t_max": [1, 3, 5],
    "latent": [16, 64, 128],
    "pipeline.train_questions": 3000,
    "pipeline.eval_questions": 500,
    "pipeline.autoencoder.epochs": 2,
    "pipeline.lfd.epochs": 3,
    "pipeline.ppo.iterations": 8,
}


class AblateConfig(RunConfig):
    """`tprl ablate`: the paper's ablations, each setting trained and evaluated once per seed.

    Every setting is the ``pipeline`` section with a few fields changed; the data, the model and the
    precompute are shared, and so are the autoencoders and LfD policies that settings have in common.
    """

    out: Path = Field(Path("runs/ablate"), description="output directory")
    suite: Literal["paper"] = Field("paper", description="paper: Tables 6-8, the latent sweep and the RL optimisers")
    ablations: list[str] = Field([], description=f"only these ({', '.join(ABLATIONS)}; none: the whole suite)")
    quick: bool = Field(False, description="fewer seeds, settings, questions and iterations (about an hour here)")
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="training seeds of every setting")
    t_max: list[int] = Field([1, 2, 3, 4, 5], min_length=1, description="t_max: steps per episode compared")
    latent: list[int] = Field([16, 32, 64, 128], min_length=1, description="latent: code sizes compared")
    pipeline: PipelineConfig = Field(PipelineConfig(), description="the settings every ablation starts from")

    wired: ClassVar[frozenset[str]] = frozenset(ABLATE_WIRED)

    @model_validator(mode="before")
    @classmethod
    def _quick(cls, data: Any) -> Any:
        if not (isinstance(data, dict) and data.get("quick") in (True, "true")):
            return data
        quick: dict[str, Any] = {}
        for key, value in QUICK.items():
            set_dotted(quick, key, value)
        deep_merge(quick, data)  # what the file and the flags give wins
        return quick

    @field_validator("ablations")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        return [known_name("ablation", name, ABLATIONS) for name in names]

    @field_validator("t_max", "latent")
    @classmethod
    def _positive(cls, values: list[int], info: ValidationInfo) -> list[int]:
        if min(values) < 1:
            raise ValueError(f"{info.field_name} values must be at least 1, got {values}")
        return values

    @model_validator(mode="after")
    def _seeds(self):
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed")
        if wired := sorted(set(ABLATE_WIRED) & self.pipeline.model_fields_set):
            raise ValueError(f"pipeline: {wired} are set by tprl ablate")
        return self

    def chosen(self) -> list[str]:
        """The ablations to run, in the suite's order."""
        return [name for name in SUITES[self.suite] if not self.ablations or name in self.ablations]


COMMANDS = (
    Command(
        ("pipeline",),
        PipelineConfig,
        "tprl_ray.pipeline.run:command",
        "every stage, then every pruner evaluated (default: the embedded model and data)",
    ),
    Command(
        ("ablate",),
        AblateConfig,
        "tprl_ray.pipeline.ablate:command",
        "the paper's ablations (Tables 6-8, latent size, RL optimisers) over several seeds",
    ),
)
