"""Configuration of the embedded benchmark's generator (`tprl data digits`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from tprl_ray.config import Command, StageConfig

GRID = 4  # cells per side of a board
CATEGORIES = ("read", "exist", "count", "where")  # question kinds


class DigitsConfig(StageConfig):
    """`tprl data digits`: where and how to build the digit-grid benchmark."""

    out: Path = Field(Path("runs/data/digits"), description="output directory")
    seed: int = Field(0, description="seed for the digit split, scenes and questions")
    split_sizes: dict[str, int] = Field(
        {"train": 3000, "val": 300, "test": 500},
        description="scenes per split (four questions each); val draws on the train digit pool",
    )
    test_digit_fraction: float = Field(0.3, gt=0.0, lt=1.0, description="digit images held out for test")
    min_digits: int = Field(3, ge=2, le=GRID * GRID)
    max_digits: int = Field(8, ge=2, le=GRID * GRID)

    @field_validator("split_sizes")
    @classmethod
    def _known_splits(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = set(value) - {"train", "val", "test"}
        if unknown:
            raise ValueError(f"unknown split(s) {sorted(unknown)}; use train, val, test")
        if any(n < 0 for n in value.values()):
            raise ValueError("split sizes must be >= 0")
        return value


COMMANDS = (
    Command(
        ("data", "digits"), DigitsConfig, "tprl_ray.data.digits:command", "build the embedded digit-grid VQA benchmark"
    ),
)
