"""Configuration of the embedded benchmark's generator (`tprl data digits`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tprl_ray.config import Command, Section, StageConfig, known_name

GRID = 4  # cells per side of a board
MAX_BOARD = 6  # the largest board side (columns a..f)
CATEGORIES = ("read", "exist", "count", "where")  # question kinds
# MME's 14 subtasks as its eval_tool spells them, perception then cognition (its scorer, its importer).
MME_SUBTASKS = {
    "perception": (
        "existence",
        "count",
        "position",
        "color",
        "posters",
        "celebrity",
        "scene",
        "landmark",
        "artwork",
        "OCR",
    ),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}


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
    boards: list[int] = Field(
        [GRID],
        description="board sides in cells (2-6); with several, each scene draws one: 24-px cells, so a 6x6 "
        "board is a 144-px image beside the 96-px 4x4 (the two-resolution variant: [4, 6])",
    )

    @field_validator("boards")
    @classmethod
    def _board_sides(cls, value: list[int]) -> list[int]:
        if not value or any(not 2 <= side <= MAX_BOARD for side in value) or len(set(value)) != len(value):
            raise ValueError(f"boards must be distinct sides between 2 and {MAX_BOARD} cells, got {value}")
        return value

    @model_validator(mode="after")
    def _digits_fit(self):
        if self.max_digits > min(self.boards) ** 2:
            raise ValueError(f"max_digits {self.max_digits} do not fit a {min(self.boards)}x{min(self.boards)} board")
        return self

    @field_validator("split_sizes")
    @classmethod
    def _known_splits(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = set(value) - {"train", "val", "test"}
        if unknown:
            raise ValueError(f"unknown split(s) {sorted(unknown)}; use train, val, test")
        if any(n < 0 for n in value.values()):
            raise ValueError("split sizes must be >= 0")
        return value


class DataPart(Section):
    """One named split of a training mixture and its sampling weight."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$", description="the dataset's name (recorded per sample)")
    path: Path = Field(description="split directory in the LLaVA layout (e.g. an imported VQAv2 train2014)")
    weight: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="the environment draws this part with probability weight / sum"
    )
    val: Path | None = Field(None, description="its validation split (None: none from this part)")


def check_parts(parts: list[DataPart]) -> list[DataPart]:
    """Parts with distinct names (for field validators)."""
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"mixture parts {names} repeat a name")
    return parts


# The benchmarks `tprl data import` reads, each from LLaVA's evaluation files or lmms-lab's Parquet.
IMPORTERS = ("gqa", "vqav2", "pope", "mme", "mmbench", "seed", "scienceqa")


class ImportConfig(StageConfig):
    """`tprl data import BENCHMARK --src PATH --out DIR`: a benchmark's own files in, one split in this
    project's layout out (questions.jsonl, answers.jsonl, images/, rejects.jsonl, import.json)."""

    benchmark: str = Field(description=f"one of {', '.join(IMPORTERS)}")
    src: Path | None = Field(
        None,
        description="the benchmark's folder (LLaVA's playground/data/eval/<name>) or an lmms-lab dataset "
        "in a local Hugging Face cache (datasets--lmms-lab--<name>)",
    )
    out: Path = Field(Path("runs/data/imported"), description="split directory to write")
    source: Literal["auto", "llava", "lmms"] = Field(
        "auto", description="llava: LLaVA's evaluation files; lmms: lmms-lab Parquet; auto: lmms if src holds Parquet"
    )
    split: str | None = Field(None, description="the source's split (default: the benchmark's evaluation split)")
    images: Path | None = Field(None, description="folder of the images when not where the benchmark keeps them")
    lenient: bool = Field(False, description="malformed records go to rejects.jsonl with their reason (default: stop)")
    limit: int = Field(0, ge=0, description="first N records only (0: all)")

    @field_validator("benchmark")
    @classmethod
    def _known(cls, value: str) -> str:
        return known_name("benchmark", value, IMPORTERS)


COMMANDS = (
    Command(
        ("data", "digits"), DigitsConfig, "tprl_ray.data.digits:command", "build the embedded digit-grid VQA benchmark"
    ),
    Command(
        ("data", "import"),
        ImportConfig,
        "tprl_ray.data.importers.run:command",
        "import a benchmark from LLaVA's evaluation files or lmms-lab Parquet",
        positional=("benchmark",),
    ),
)
