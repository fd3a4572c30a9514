"""Configurations of evaluation (`tprl eval`), efficiency accounting (`tprl efficiency`) and reports (`tprl report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from tprl_ray.config import (
    EMBEDDED_LFD,
    EMBEDDED_MODELS,
    PAPER_BUDGETS,
    PAPER_CONFIGS,
    BackboneConfig,
    Command,
    PoolConfig,
    RunConfig,
    Section,
    StageConfig,
    check_budgets,
    known_name,
)
from tprl_ray.evaluation.metrics import BENCHMARKS
from tprl_ray.pruners.registry import LEARNED, PRUNERS

SHIPPED = {**EMBEDDED_MODELS, **PAPER_CONFIGS}

BenchmarkName = Annotated[str, AfterValidator(lambda name: known_name("benchmark", name, BENCHMARKS))]


class SuiteEntry(Section):
    """One benchmark of an evaluation suite: a column of the Table 1 report."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$", description="the column's name (gqa, mmbench, ...)")
    benchmark: BenchmarkName | None = Field(None, description="its scorer (default: name)")
    data: Path = Field(description="split directory in the LLaVA layout (e.g. `tprl data import` output)")
    limit: int | None = Field(None, ge=0, description="first N questions (None: the evaluation's limit)")

    @property
    def scorer(self) -> str:
        return self.benchmark or known_name("benchmark", self.name, BENCHMARKS)


class SuiteFile(StageConfig):
    """A suite file (`tprl eval --suite FILE.yaml`): ``benchmarks: [{name, benchmark, data, limit}]``;
    relative paths are relative to the working directory, as everywhere else."""

    benchmarks: list[SuiteEntry] = Field(min_length=1)


def scorers(suite: list[SuiteEntry] | None, benchmark: str) -> set[str]:
    """The scorers an evaluation uses: its suite's, or its one benchmark's."""
    return {e.scorer for e in suite} if suite else {benchmark}


def check_suite(value: Path | list[SuiteEntry] | None) -> list[SuiteEntry] | None:
    """A suite file read into its entries (a ConfigError naming the file), the names distinct."""
    if isinstance(value, Path):
        value = SuiteFile.load(value).benchmarks
    if value is not None:
        names = [e.name for e in value]
        if len(set(names)) != len(names):
            raise ValueError(f"suite benchmarks {names} repeat a name")
        for entry in value:
            entry.scorer  # noqa: B018 (a name that is not a benchmark needs `benchmark`)
    return value


class EvalConfig(RunConfig):
    """`tprl eval`: a benchmark split unpruned and under every (pruner, budget) setting, on a Ray Data actor pool."""

    backbone: BackboneConfig = BackboneConfig()
    data: Path = Field(Path("runs/demo/data/test"), description="split directory in the LLaVA layout")
    benchmark: BenchmarkName = Field("digits", description=f"scorer: {', '.join(BENCHMARKS)}")
    pruners: list[str] = Field(["random"], min_length=1, description=f"any of {', '.join(PRUNERS)} (a,b,c)")
    budgets: list[float] = Field(
        [0.25], min_length=1, description="kept fractions in (0, 1] or whole kept token counts (> 1)"
    )
    cap_budgets: bool = Field(
        False,
        description="a token count above the model's visual tokens keeps them all (the row records the "
        "effective budget); by default it is refused",
    )
    policies: dict[str, Path] = Field(
        {},
        description="directories of the learned pruners, e.g. tprl=runs/ppo "
        "(lfd default: the one shipped for the embedded model)",
    )
    out: Path = Field(Path("runs/eval/report.json"), description="report JSON (predictions beside it)")
    limit: int = Field(0, ge=0, description="first N questions only (0: all)")
    max_new_tokens: int = Field(8, ge=1)
    pool: PoolConfig = Field(PoolConfig(), description="the model's actor pool (questions per call: batch_size)")
    run_name: str = Field("evaluation", description="name of the MLflow run")
    suite: Path | list[SuiteEntry] | None = Field(
        None,
        description="a suite YAML file (benchmarks: [{name, benchmark, data, limit}]): every benchmark with "
        "its scorer instead of data/benchmark, then the Table 1 report at out",
    )

    @field_validator("suite")
    @classmethod
    def _suite(cls, value):
        return check_suite(value)

    @field_validator("pruners", "policies")
    @classmethod
    def _known_pruners(cls, value, info: ValidationInfo):
        for name in value:
            known_name("pruner", name, PRUNERS if info.field_name == "pruners" else LEARNED)
        return value

    @model_validator(mode="after")
    def _runnable(self):
        if "tprl" in self.pruners and "tprl" not in self.policies:
            raise ValueError("pruner 'tprl' needs the directory of a `tprl train ppo` output (--policies tprl=DIR)")
        if "oracle" in self.pruners and scorers(self.suite, self.benchmark) != {"digits"}:
            raise ValueError("pruner 'oracle' needs the digits benchmark (its questions record their cells)")
        return self

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, value: list[float]) -> list[float]:
        return check_budgets(value)


def budget_value(budget: float) -> float | int:
    """A budget as pruners take it: a kept fraction (<= 1) or a kept token count (> 1)."""
    return budget if budget <= 1 else int(budget)


def setting_label(pruner: str, budget: float) -> str:
    """``vispruner_25`` for 25% of the tokens, ``vispruner_192t`` for 192 of them."""
    return f"{pruner}_{round(budget * 100)}" if budget <= 1 else f"{pruner}_{int(budget)}t"


class EfficiencyConfig(StageConfig):
    """`tprl efficiency`: FLOPs and KV cache of one image + prompt, printed as JSON."""

    model: str = Field("llava-1.5-7b", description=f"a shipped name ({', '.join(SHIPPED)}) or a config directory")
    tokens: int = Field(576, ge=1, description="visual tokens kept (for fastv: kept after layer K)")
    text_tokens: int = Field(0, ge=0, description="prompt text tokens")
    new_tokens: int = Field(0, ge=0, description="decode steps after the prefill")
    pruner: str = Field("none", description="adds the pruner's own FLOPs and per-layer tokens (fastv)")
    full_tokens: int | None = Field(
        None, ge=1, description="tokens before pruning (default: LLaVA's patch count; Qwen: --tokens)"
    )
    bytes_per_value: int = Field(2, ge=1, description="2 for fp16/bf16 caches")


class ReportConfig(StageConfig):
    """`tprl report`: reports of `tprl eval` or `tprl pipeline` in, one table and one plot out."""

    inputs: list[Path] = Field([Path("runs/demo/report.json")], description="report JSON files (a,b,c)")
    out: Path = Field(Path("runs/report/report.md"), description="Markdown table; the plot is written beside it")
    table1: bool = Field(
        False,
        description="the paper's Table 1 layout, a column per report (it is the layout anyway for reports of "
        "several benchmarks or a suite report); the JSON is written beside out",
    )
    mlflow_uri: str | None = None


class VizConfig(StageConfig):
    """`tprl viz`: trajectory figures of a learned pruner, one PNG per question (in this process)."""

    backbone: BackboneConfig = BackboneConfig()
    data: Path = Field(Path("runs/demo/data/test"), description="split directory in the LLaVA layout")
    policy: Path = Field(
        EMBEDDED_LFD, description="a learned pruner's directory (`tprl train ppo` or `tprl train lfd` output)"
    )
    budgets: list[float] = Field(
        PAPER_BUDGETS, min_length=1, description="kept fraction after each step T = 1, 2, ... (sorted descending)"
    )
    questions: list[Annotated[str, BeforeValidator(str)]] = Field(
        [], description="question ids (none: `count` questions, the categories in turn)"
    )
    count: int = Field(8, ge=1, description="questions to draw when none are named")
    out: Path = Field(Path("runs/viz"), description="directory of the PNGs and trajectories.json")
    max_new_tokens: int = Field(8, ge=1)
    mlflow_uri: str | None = Field(None, description="tracking URI (default: sqlite under the output directory)")

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, value: list[float]) -> list[float]:
        return sorted(check_budgets(value, counts=False), reverse=True)


COMMANDS = (
    Command(
        ("eval",),
        EvalConfig,
        "tprl_ray.evaluation.engine:command",
        "evaluate a benchmark unpruned and under every (pruner, budget) on a Ray Data actor pool",
    ),
    Command(
        ("efficiency",),
        EfficiencyConfig,
        "tprl_ray.evaluation.efficiency:command",
        "FLOPs and KV-cache bytes of a model config, as JSON",
    ),
    Command(
        ("report",), ReportConfig, "tprl_ray.evaluation.report:command", "one table and a Pareto plot from reports"
    ),
    Command(
        ("viz",),
        VizConfig,
        "tprl_ray.evaluation.trajectory:command",
        "trajectory figures: the tokens a learned pruner keeps at each step, one PNG per question",
    ),
)
