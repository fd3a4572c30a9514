"""Reading and writing benchmarks in the LLaVA evaluation layout.

A split directory holds ``questions.jsonl`` (one ``{"question_id", "image", "text", "category"}``
per line, plus any benchmark fields such as ``options`` or ``index``), ``answers.jsonl``
(``{"question_id", "answer"}``, the answer a string or, for VQAv2, the list of human answers) and
``images/`` with the files the questions name. Every problem is reported as :class:`DataError` with
the file and line it comes from.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tprl_ray.artifacts.atomic import atomic_write_bytes


class DataError(ValueError):
    """Bad benchmark input; ``str()`` is one line naming the file (and line) at fault."""


@dataclass(frozen=True)
class Sample:
    """One question; ``answer`` is a list for benchmarks with several references (VQAv2) and
    ``extra`` holds the question's other fields (options, original index, ...)."""

    question_id: str
    image: str
    text: str
    category: str
    answer: str | list[str]
    extra: dict = field(default_factory=dict)


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def write_split(split_dir: Path, samples: list[Sample], images: dict[str, np.ndarray]) -> None:
    """Write a split atomically file by file: images first, the jsonl files last."""
    for name, pixels in images.items():
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        atomic_write_bytes(split_dir / "images" / name, buf.getvalue())
    atomic_write_bytes(
        split_dir / "questions.jsonl",
        _jsonl(
            [
                {"question_id": s.question_id, "image": s.image, "text": s.text, "category": s.category, **s.extra}
                for s in samples
            ]
        ),
    )
    atomic_write_bytes(
        split_dir / "answers.jsonl", _jsonl([{"question_id": s.question_id, "answer": s.answer} for s in samples])
    )


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
            rows.append((lineno, row))
    return rows


def _unique_ids(path: Path, rows: list[tuple[int, dict]]) -> None:
    """Raise :class:`DataError` at the first question id seen twice in ``rows``."""
    first: dict[str, int] = {}
    for lineno, row in rows:
        qid = str(row["question_id"])
        if qid in first:
            raise DataError(f"{path}:{lineno}: duplicate question_id {qid!r} (first at line {first[qid]})")
        first[qid] = lineno


@dataclass(frozen=True)
class Reject:
    """A question left out of a run, and why."""

    question_id: str
    image: str
    reason: str


def read_split(
    split_dir: str | Path,
    categories: tuple[str, ...] | None = None,
    check_images: bool = True,
    rejects: list[Reject] | None = None,
) -> list[Sample]:
    """Read and validate a split; ``categories`` restricts the allowed question categories.

    By default any bad question raises :class:`DataError`. With a ``rejects`` list, a question
    without an answer or text (or, when checking images, with an unreadable image) is appended there with
    its reason and left out; problems with the files themselves (encoding, JSON, a duplicate id, an
    empty split, an unknown category) still raise.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: data directory not found")
    qpath, apath = split_dir / "questions.jsonl", split_dir / "answers.jsonl"
    questions = _read_jsonl(qpath, ("question_id", "image", "text", "category"))
    if not questions:
        raise DataError(f"{qpath}: no questions")
    _unique_ids(qpath, questions)
    answer_rows = _read_jsonl(apath, ("question_id", "answer"))
    _unique_ids(apath, answer_rows)
    answers = {}
    for _, row in answer_rows:
        answer = row["answer"]
        answers[str(row["question_id"])] = [str(a) for a in answer] if isinstance(answer, list) else str(answer)
    samples, checked = [], set()
    for lineno, row in questions:
        qid = str(row["question_id"])
        if categories is not None and row["category"] not in categories:
            raise DataError(
                f"{qpath}:{lineno}: unknown question category {row['category']!r} "
                f"(expected one of {', '.join(categories)})"
            )
        try:
            if qid not in answers:
                raise DataError(f"{qpath}:{lineno}: question {qid} has no answer in {apath.name}")
            if not str(row["text"]).strip():
                raise DataError(f"{qpath}:{lineno}: question {qid} has an empty text")
            if check_images and row["image"] not in checked:
                check_image(split_dir / "images" / row["image"], where=f"{qpath}:{lineno}")
                checked.add(row["image"])
        except DataError as exc:
            if rejects is None:
                raise
            rejects.append(Reject(qid, str(row["image"]), str(exc)))
            continue
        extra = {k: v for k, v in row.items() if k not in ("question_id", "image", "text", "category")}
        samples.append(Sample(qid, str(row["image"]), str(row["text"]), str(row["category"]), answers[qid], extra))
    return samples


def check_image(path: Path, where: str) -> None:
    """Raise :class:`DataError` unless ``path`` is a readable image."""
    if not path.is_file():
        raise DataError(f"{where}: image {path} not found")
    try:
        with Image.open(path) as img:
            img.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{where}: image {path} is corrupt ({exc})") from None


def load_image(split_dir: str | Path, name: str) -> Image.Image:
    """The named image of a split, as RGB."""
    path = Path(split_dir) / "images" / name
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
