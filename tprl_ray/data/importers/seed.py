"""SEED-Bench (v1): LLaVA's ``llava-seed-bench.jsonl`` with SEED's ``SEED-Bench.json``, or lmms-lab's
``SEED-Bench`` Parquet.

Sources
-------
``llava``: ``playground/data/eval/seed_bench/`` (LLaVA ``docs/Evaluation.md``, ``scripts/v1_5/eval/seed.sh``,
which runs ``llava/eval/model_vqa_loader.py`` with ``--image-folder`` that folder):

- ``llava-seed-bench.jsonl`` (from LLaVA's ``eval.zip``), one JSON object a line:
  ``question_id`` (int for image questions, e.g. ``101669``; str for video ones, e.g. ``"v1738"``): kept as
  ``question_id`` (as a string); ``image`` (path below the folder: ``SEED-Bench-image/<data_id>`` for an image
  question, the CC3M file name without a suffix; ``SEED-Bench-video-image/<question_type_id>_<question_id>.png``
  for a video question, the middle frame LLaVA's ``extract_video_frames.py`` writes): the image; ``text``: the
  prompt, kept as is (``question + "\\nA. " + choice_a + ... + "\\nD. " + choice_d + "\\nAnswer with the
  option's letter from the given choices directly."``); ``category``: the question type's name (not used:
  the name comes from ``SEED-Bench.json``).
- ``SEED-Bench.json`` (SEED-Bench's ``DATASET.md``; LLaVA's ``scripts/convert_seed_for_submission.py`` reads
  it): ``{"questions": [...], "question_type": {name: id}}``; per question ``question_id`` (str),
  ``question``, ``choice_a`` .. ``choice_d``, ``answer`` (``A``-``D``), ``data_id`` (image file name, or the
  video's file/path), ``data_type`` (``image`` / ``video``), ``question_type_id`` (1-12), ``segment`` (tasks 11
  and 12: the video segment). Kept: ``answer``; ``category`` = the type's name; ``extra.options`` ({letter:
  choice}), ``extra.data_type``, ``extra.question_type_id``. A question of the jsonl that is not in the
  json is malformed.
- ``SEED-Bench-image/`` (SEED's ``SEED-Bench-image.zip``) and ``SEED-Bench-video-image/`` (the middle frames
  LLaVA's guide extracts from the Something-Something v2, Epic-Kitchens and Breakfast videos). A frame or
  image not there is a ``missing_image``. ``--images DIR`` names the folder holding these two.

``lmms``: ``lmms-lab/SEED-Bench`` (``lmms-lab-encoder/SEED-Bench`` in newer lmms-eval), one split ``test``
(about 18k rows in the dataset viewer; SEED-Bench-1 has 19,242 questions), files
``data/test-NNNNN-of-NNNNN.parquet``. Columns: those of ``SEED-Bench.json`` (``question_id`` str,
``question``, ``choice_a`` .. ``choice_d``, ``answer``, ``data_id``, ``data_type``, ``question_type_id``) and
``image``, a list of ``datasets`` Images (``list<struct<bytes, path>>``; lmms-eval's ``seed_doc_to_visual``
feeds them all): one for an image question, the sampled frames for a video question. A video question gets
its middle frame, ``frames[(n - 1) // 2]`` (the 4th of 8), the frame nearest the middle of the clip that
LLaVA feeds; an empty list is a question without an image. ``category`` is the name of ``question_type_id``
(the table of SEED-Bench's ``DATASET.md``), or ``data_type`` in a file without that column; the prompt is
built as in LLaVA's jsonl (lmms-eval's ``seed_doc_to_text`` writes the same text).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tprl_ray.data.importers.common import (
    Bad,
    ImageRef,
    Item,
    find_dir,
    find_file,
    missing_fields,
    parquet_files,
    parquet_image,
    parquet_rows,
    read_json,
    read_jsonl,
)
from tprl_ray.data.layout import DataError

SPLITS = {"llava": ("test",), "lmms": ("test",)}

ANSWER_DIRECTLY = "Answer with the option's letter from the given choices directly."
CHOICES = ("choice_a", "choice_b", "choice_c", "choice_d")
LETTERS = "ABCD"
# SEED-Bench-1's evaluation dimensions (DATASET.md; the "question_type" of SEED-Bench.json).
QUESTION_TYPES = {
    1: "Scene Understanding",
    2: "Instance Identity",
    3: "Instance Attributes",
    4: "Instance Location",
    5: "Instances Counting",
    6: "Spatial Relation",
    7: "Instance Interaction",
    8: "Visual Reasoning",
    9: "Text Understanding",
    10: "Action Recognition",
    11: "Action Prediction",
    12: "Procedure Understanding",
}


def records(src: Path, source: str, split: str, images: Path | None) -> Iterator[Item | Bad]:
    if source == "lmms":
        yield from _lmms(parquet_files(src, split))
    else:
        yield from _llava(src, images)


def prompt(question: str, choices: list[str]) -> str:
    """LLaVA's SEED-Bench prompt (the ``text`` of ``llava-seed-bench.jsonl``)."""
    lines = [question, *(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices)), ANSWER_DIRECTLY]
    return "\n".join(lines)


def _question(q: dict, where: str, qid: str, types: dict[int, str], strict: bool = True):
    """(choices, answer, category, extra) of a SEED-Bench question, or :class:`Bad`; not ``strict``: a
    question without ``question_type_id`` is categorised by its ``data_type``."""
    if problem := missing_fields(q, ("question", *CHOICES, "answer", "data_type")):
        return Bad(where, problem, qid)
    if not all(isinstance(q[f], str) for f in ("question", *CHOICES, "answer", "data_type")):
        return Bad(where, "question, choices, answer and data_type must be strings", qid)
    answer = q["answer"].strip()
    if answer not in LETTERS:
        return Bad(where, f"answer {q['answer']!r} is not one of the options A, B, C, D", qid)
    choices = [q[c] for c in CHOICES]
    extra = {"options": dict(zip(LETTERS, choices)), "data_type": q["data_type"], "question_type_id": None}
    if "question_type_id" not in q and not strict:  # a Parquet file without the column
        return choices, answer, q["data_type"], extra
    type_id = q.get("question_type_id")
    if isinstance(type_id, str) and type_id.strip().isdigit():
        type_id = int(type_id)
    if isinstance(type_id, bool) or type_id not in types:
        return Bad(where, f"unknown question_type_id {q.get('question_type_id')!r}", qid)
    return choices, answer, types[type_id], {**extra, "question_type_id": type_id}


# ----------------------------------------------------------------------------- llava


def _llava(src: Path, images: Path | None) -> Iterator[Item | Bad]:
    questions_file = find_file(src, "llava-seed-bench.jsonl", "LLaVA's SEED-Bench question file")
    annotations = find_file(src, "SEED-Bench.json", "SEED-Bench's annotation file")
    data = read_json(annotations)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise DataError(f"{annotations}: expected an object with a 'questions' list")
    names = data.get("question_type", {})
    if not isinstance(names, dict):
        raise DataError(f"{annotations}: 'question_type' must be an object {{name: id}}")
    types = {**QUESTION_TYPES, **{v: k for k, v in names.items() if isinstance(v, int)}}
    by_id = {str(q["question_id"]): q for q in data["questions"] if isinstance(q, dict) and "question_id" in q}
    root = images or src
    find_dir(root, ("SEED-Bench-image", "SEED-Bench-video-image"), "SEED-Bench's image folder")
    for where, row, problem in read_jsonl(questions_file):
        if problem:
            yield Bad(where, problem)
            continue
        qid = str(row.get("question_id", ""))
        if problem := missing_fields(row, ("question_id", "image", "text")):
            yield Bad(where, problem, qid)
            continue
        if not isinstance(row["image"], str) or not isinstance(row["text"], str) or not row["text"].strip():
            yield Bad(where, "image and text must be non-empty strings", qid)
            continue
        if qid not in by_id:
            yield Bad(where, f"question {qid} is not in {annotations.name}", qid)
            continue
        parsed = _question(by_id[qid], f"{annotations}: question '{qid}'", qid, types)
        if isinstance(parsed, Bad):
            yield parsed
            continue
        _, answer, category, extra = parsed
        yield Item(qid, row["text"], category, answer, ImageRef(path=root / row["image"]), where, extra)


# ----------------------------------------------------------------------------- lmms


def _lmms(files: list[Path]) -> Iterator[Item | Bad]:
    for where, row in parquet_rows(files):
        qid = str(row.get("question_id") or "")
        if problem := missing_fields(row, ("question_id", "image")):
            yield Bad(where, problem, qid)
            continue
        parsed = _question(row, where, qid, QUESTION_TYPES, strict=False)
        if isinstance(parsed, Bad):
            yield parsed
            continue
        choices, answer, category, extra = parsed
        cell = row["image"]
        if isinstance(cell, list):  # the frames of a video question, or the one image
            cell = cell[(len(cell) - 1) // 2] if cell else None
        image = None if cell is None else parquet_image(cell, where, qid)
        if isinstance(image, Bad):
            yield image
            continue
        yield Item(qid, prompt(row["question"], choices), category, answer, image, where, extra)
