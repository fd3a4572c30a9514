"""Configuration of the precompute stage (`tprl precompute`, `pipelines/precompute.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from tprl_ray.config import BackboneConfig, Command, PoolConfig, RayConfig
from tprl_ray.data.config import DataPart, check_parts


def check_schedule(schedule: list[float]) -> list[float]:
    """A demonstration schedule: pruned fractions starting at 0.0, non-decreasing, below 1."""
    if (
        len(schedule) < 2
        or schedule[0] != 0.0
        or any(not 0.0 <= f < 1.0 for f in schedule)
        or list(schedule) != sorted(schedule)
    ):
        raise ValueError(
            f"demonstration schedule {schedule} must start at 0.0 (no pruning) and continue with at "
            f"least one more non-decreasing pruned fraction below 1"
        )
    return list(schedule)


class PrecomputeConfig(RayConfig):
    """`tprl precompute` / `pipelines/precompute.py`: one split in, one Parquet dataset out."""

    data: Path | list[DataPart] = Field(
        Path("runs/demo/data/train"),
        description="split directory in the LLaVA layout, or a mixture: a list of {name, path, weight} "
        "(sample ids become name/id, each row records its dataset)",
    )
    out: Path = Field(Path("runs/precompute/train"), description="dataset directory")
    backbone: BackboneConfig = BackboneConfig()
    pool: PoolConfig = Field(
        PoolConfig(size=2, cpus=0.75),
        description="the model's actor pool (questions per model call: batch_size); with gpus None (detect), at most "
        "as many actors as the cluster's GPUs, or CPUs, hold",
    )
    demonstrator: Literal["vispruner", "cdpruner"] = Field(
        "vispruner", description="pruner whose nested keep-masks LfD imitates (cdpruner: question-aware)"
    )
    demo_schedule: list[float] = Field([0.0, 0.25, 0.5], description="pruned fraction of the tokens per step")
    shard_size: int = Field(256, ge=1, description="questions per Parquet shard")
    threads: int = Field(
        1,
        ge=1,
        description="torch CPU threads per model actor (much of a row's work is single-threaded Python: on CPUs, "
        "more actors beat more threads)",
    )
    decode_cpus: float = Field(0.25, gt=0, description="CPUs per image-decoding task")
    decode_tasks: int = Field(2, ge=1, description="image-decoding tasks at once")
    limit: int = Field(0, ge=0, description="first N questions only, of each part of a mixture (0: all)")

    @field_validator("data")
    @classmethod
    def _parts(cls, value):
        return check_parts(value) if isinstance(value, list) else value

    @field_validator("demo_schedule")
    @classmethod
    def _schedule(cls, value: list[float]) -> list[float]:
        return check_schedule(value)


COMMANDS = (
    Command(
        ("precompute",),
        PrecomputeConfig,
        "tprl_ray.precompute.job:command",
        "features, query embeddings, scores and demonstrations to Parquet (Ray Data)",
    ),
)
