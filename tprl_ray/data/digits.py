"""The embedded benchmark: visual questions about grids of real handwritten digits.

A scene is a ``GRID x GRID`` board of ``CELL``-pixel cells, some holding one of the 1,797 real
handwritten digits that scikit-learn ships (8x8, 17 grey levels, upscaled), the rest empty with
background noise. Cells are named like a chess board: columns ``a..d`` left to right, rows ``1..4``
top to bottom. The two-resolution variant (``boards: [4, 6]``) draws each scene's board side, so a
6x6 board is a 144-px image (columns ``a..f``) beside the 96-px 4x4 one: same cells, more tokens.
Four question types, each answerable only from the tokens of the asked-about cells:

- ``read``:  "what digit is at c2 ?"          -> the digit in that (occupied) cell, e.g. ``7``
- ``exist``: "is there a 7 ?"                 -> ``yes`` / ``no`` (balanced)
- ``count``: "how many 7 are there ?"         -> ``0`` .. ``3`` (balanced)
- ``where``: "where is the 5 ?"               -> the cell of a digit that occurs exactly once, ``b3``

Digit images are split once per seed into disjoint pools, so test scenes only use digit images never
seen in training. Splits are written in the LLaVA evaluation layout (see :mod:`tprl_ray.data.layout`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from tprl_ray.artifacts.atomic import atomic_write_bytes
from tprl_ray.data.config import CATEGORIES, GRID, MAX_BOARD, DigitsConfig
from tprl_ray.data.layout import Sample, write_split

CELL = 24
IMAGE_SIZE = GRID * CELL
DIGIT_SIZE = 20


def board_side(labels: np.ndarray) -> int:
    """The side of the board whose cell labels are ``labels``."""
    return round(len(labels) ** 0.5)


def cell_names(side: int) -> tuple[str, ...]:
    """Names of a ``side x side`` board's cells in raster order (``a1``, ``b1``, ...)."""
    return tuple(f"{'abcdef'[c]}{r + 1}" for r in range(side) for c in range(side))


CELL_NAMES = cell_names(GRID)
ALL_CELL_NAMES = cell_names(MAX_BOARD)
DIGIT_POOLS = ("train", "test")
SCHEMA_VERSION = 3  # 2: each question records the cells it is about ("cells"); 3: and its board side ("board")
TEMPLATES = {
    "read": "what digit is at {} ?",
    "exist": "is there a {} ?",
    "count": "how many {} are there ?",
    "where": "where is the {} ?",
}


@dataclass(frozen=True)
class Scene:
    """One board: ``labels[cell]`` is the digit in that cell or -1; ``image`` is uint8 HxW."""

    labels: np.ndarray
    image: np.ndarray

    @property
    def side(self) -> int:
        return board_side(self.labels)


def load_digit_pools(seed: int, test_fraction: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split sklearn's digits into disjoint, class-stratified ``train`` / ``test`` pools.

    Returns pool name -> (images float32 [n, 8, 8] in [0, 1], labels int64 [n]).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng([seed, 0xD161])
    test_idx = []
    for d in range(10):
        idx = np.flatnonzero(digits.target == d)
        rng.shuffle(idx)
        test_idx.extend(idx[: round(len(idx) * test_fraction)])
    is_test = np.zeros(len(digits.target), dtype=bool)
    is_test[test_idx] = True
    images = (digits.images / 16.0).astype(np.float32)
    return {
        "train": (images[~is_test], digits.target[~is_test]),
        "test": (images[is_test], digits.target[is_test]),
    }


def pool_fingerprint(pools: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """Hash of the test pool: a model trained on a split must only be evaluated on its own test pool."""
    return hashlib.sha256(pools["test"][0].tobytes()).hexdigest()[:16]


class SceneSampler:
    """Draws random scenes and balanced questions from one digit pool."""

    def __init__(
        self,
        pool: tuple[np.ndarray, np.ndarray],
        rng: np.random.Generator,
        min_digits: int = 3,
        max_digits: int = 8,
        boards: tuple[int, ...] = (GRID,),
    ):
        self.images, self.labels = pool
        self.by_label = [np.flatnonzero(self.labels == d) for d in range(10)]
        self.rng = rng
        self.min_digits, self.max_digits = min_digits, max_digits
        self.boards = tuple(boards)

    def scene(self, reps: int) -> Scene:
        """A board with one digit planted ``reps`` (1-3) times and the other cells drawn freely; with
        several board sides, the side is drawn first (one side: the single-board stream, unchanged)."""
        rng = self.rng
        side = self.boards[0] if len(self.boards) == 1 else int(rng.choice(self.boards))
        while True:
            k = int(rng.integers(max(self.min_digits, reps), self.max_digits + 1))
            planted = int(rng.integers(10))
            others = rng.choice([d for d in range(10) if d != planted], size=max(k - reps, 0))
            digits = np.concatenate([np.full(min(reps, k), planted), others])
            counts = np.bincount(digits, minlength=10)
            if (counts == 1).any() and counts.max() <= 3:
                break
        labels = np.full(side * side, -1, dtype=np.int64)
        labels[rng.choice(side * side, size=len(digits), replace=False)] = digits
        return Scene(labels=labels, image=self.render(labels))

    def render(self, labels: np.ndarray) -> np.ndarray:
        rng = self.rng
        side = board_side(labels)
        canvas = rng.normal(0.08, 0.04, size=(side * CELL, side * CELL)).clip(0, 1)
        for cell, d in enumerate(labels):
            if d < 0:
                continue
            src = self.images[rng.choice(self.by_label[d])]
            glyph = Image.fromarray((src * 255).astype(np.uint8)).resize(
                (DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BILINEAR
            )
            glyph = np.asarray(glyph, dtype=np.float32) / 255.0 * rng.uniform(0.6, 1.0)
            slack = CELL - DIGIT_SIZE
            y = (cell // side) * CELL + int(rng.integers(0, slack + 1))
            x = (cell % side) * CELL + int(rng.integers(0, slack + 1))
            patch = canvas[y : y + DIGIT_SIZE, x : x + DIGIT_SIZE]
            np.maximum(patch, glyph, out=patch)
        return (canvas * 255).round().astype(np.uint8)

    def sample(self) -> tuple[Scene, list[tuple[str, str, str]]]:
        """A scene and its four questions; the count answer is uniform over 0..3."""
        target = int(self.rng.integers(0, 4))
        scene = self.scene(reps=target or int(self.rng.integers(1, 4)))
        return scene, self.questions(scene.labels, count_target=target)

    def questions(self, labels: np.ndarray, count_target: int) -> list[tuple[str, str, str]]:
        """One (category, question, answer) per category; ``labels`` has a digit ``count_target`` times."""
        rng = self.rng
        counts = np.bincount(labels[labels >= 0], minlength=10)
        occupied = np.flatnonzero(labels >= 0)
        cell = int(rng.choice(occupied))
        present, absent = np.flatnonzero(counts > 0), np.flatnonzero(counts == 0)
        if rng.random() < 0.5:
            exist_digit, exist_answer = int(rng.choice(present)), "yes"
        else:
            exist_digit, exist_answer = int(rng.choice(absent)), "no"
        count_digit = int(rng.choice(np.flatnonzero(counts == count_target)))
        where_digit = int(rng.choice(np.flatnonzero(counts == 1)))
        where_cell = int(np.flatnonzero(labels == where_digit)[0])
        names = cell_names(board_side(labels))
        return [
            ("read", TEMPLATES["read"].format(names[cell]), str(labels[cell])),
            ("exist", TEMPLATES["exist"].format(exist_digit), exist_answer),
            ("count", TEMPLATES["count"].format(count_digit), str(count_target)),
            ("where", TEMPLATES["where"].format(where_digit), names[where_cell]),
        ]


def key_word(question: str) -> str:
    """The word a question is about: its cell name or its digit."""
    return next(w for w in question.split() if w in ALL_CELL_NAMES or w.isdigit())


def question_cells(labels: np.ndarray, question: str) -> list[int]:
    """The cells a question is about: the asked cell, or every cell holding the asked digit."""
    word, names = key_word(question), cell_names(board_side(labels))
    return [names.index(word)] if word in ALL_CELL_NAMES else np.flatnonzero(labels == int(word)).tolist()


def split_rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, ["train", "val", "test"].index(split) + 1])


def pool_for_split(split: str) -> str:
    return "test" if split == "test" else "train"


def build_digits(cfg: DigitsConfig) -> dict[str, int]:
    """Write every split of the benchmark under ``cfg.out``; returns split -> number of questions."""
    if cfg.min_digits > cfg.max_digits:
        raise ValueError(f"min_digits {cfg.min_digits} > max_digits {cfg.max_digits}")
    pools = load_digit_pools(cfg.seed, cfg.test_digit_fraction)
    cfg.out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n_scenes in cfg.split_sizes.items():
        sampler = SceneSampler(
            pools[pool_for_split(split)], split_rng(cfg.seed, split), cfg.min_digits, cfg.max_digits, cfg.boards
        )
        samples, images = [], {}
        for i in tqdm(range(n_scenes), desc=f"digits/{split}", unit="scene", leave=False):
            scene, questions = sampler.sample()
            name = f"{split}_{i:06d}.png"
            images[name] = scene.image
            for category, text, answer in questions:
                qid = f"{split}-{i:06d}-{category}"
                extra = {"cells": question_cells(scene.labels, text), "board": scene.side}
                samples.append(Sample(qid, name, text, category, answer, extra))
        write_split(cfg.out / split, samples, images)
        written[split] = len(samples)
    meta = {
        "benchmark": "digits",
        "schema_version": SCHEMA_VERSION,
        "config": json.loads(cfg.model_dump_json()),
        "image_size": IMAGE_SIZE,  # of a 4x4 board; a board of side s is s * cell pixels
        "grid": GRID,
        "boards": list(cfg.boards),
        "image_sizes": [side * CELL for side in cfg.boards],
        "cell": CELL,
        "categories": list(CATEGORIES),
        "test_pool_fingerprint": pool_fingerprint(pools),
        "questions": written,
    }
    atomic_write_bytes(cfg.out / "meta.json", json.dumps(meta, indent=2).encode())
    return written


def command(cfg: DigitsConfig) -> None:
    """`tprl data digits`."""
    written = build_digits(cfg)
    print(f"wrote {cfg.out}: " + ", ".join(f"{k} {v} questions" for k, v in written.items()))
