"""ScienceQA: the official ``problems.json`` + ``pid_splits.json`` (LLaVA's layout) or lmms-lab's
``ScienceQA`` Parquet. Questions without an image are rejected as ``no_image``: what is left is the IMG
subset that LLaVA-1.5 reports.

Sources
-------
``llava``: ``playground/data/eval/scienceqa/`` holding the files of lupantech/ScienceQA ``data/scienceqa``
(LLaVA ``docs/Evaluation.md``):

- ``problems.json``: ``{pid: problem}`` (ScienceQA ``README.md``), a problem being ``question`` (str),
  ``choices`` (2-5 str), ``answer`` (index into choices), ``hint`` (the textual context, may be ""),
  ``image`` (file name in the problem's folder, ``"image.png"``, or null), ``task``, ``grade``, ``subject``
  (natural / social / language science), ``topic``, ``category``, ``skill``, ``lecture``, ``solution``,
  ``split`` (train / val / test). Kept: ``question_id`` = pid; ``answer`` = the letter of ``answer``;
  ``category`` = ``subject``; ``extra.options`` ({letter: choice}), ``extra.hint``, ``extra.grade``,
  ``extra.topic``; the image (none: ``no_image``).
- ``pid_splits.json``: ``{"train", "val", "test", "trainval", "minitrain", "minival", "minitest": [pid, ...]}``;
  the split's pids, in order, are the records.
- ``images/<split>/<pid>/<image>`` (ScienceQA's ``train.zip`` / ``val.zip`` / ``test.zip``; LLaVA passes
  ``--image-folder images/test``), ``<split>`` being the problem's own split (``minival`` problems live in
  ``val``). ``--images DIR`` names the folder holding the ``<pid>/`` folders.

``lmms``: ``lmms-lab/ScienceQA`` (``lmms-lab-encoder/ScienceQA`` in newer lmms-eval), config ``ScienceQA-FULL``
(read first: its text-only questions are counted as ``no_image``) or ``ScienceQA-IMG`` (the image questions
only), splits ``test`` (4241 / 2017 rows), ``validation``, ``train``: ``<config>/<split>-NNNNN-of-NNNNN.parquet``.
Columns: ``image`` (a ``datasets`` Image, null for a text-only question), ``question``, ``choices`` (list of
str), ``answer`` (int8), ``hint``, ``task``, ``grade``, ``subject``, ``topic``, ``category``, ``skill``,
``lecture``, ``solution``, kept as above. There is no pid column: ``question_id`` is
``f"{full|img}-{split}-{row}"``, the row's position in that config's split (stable for one snapshot; it does not
match the pid).

Prompt (``text``)
-----------------
LLaVA-1.5 evaluates ``llava_test_CQM-A.json`` (``scripts/v1_5/eval/sqa.sh``), written by
``scripts/convert_sqa_to_llava.py`` with the ``CQM-A`` format of ``convert_sqa_to_llava_base_prompt.py``:
``"Context: {hint or 'N/A'}\\nQuestion: {question}\\nOptions: (A) {choice} (B) {choice} ..."`` with double
spaces made single and stripped; ``llava/eval/model_vqa_science.py --single-pred-prompt`` then appends
``"\\nAnswer with the option's letter from the given choices directly."``. Public copies of the file's
first entry agree (``{"id": "4", "conversations": [{"from": "human", "value": "Context: N/A\\nQuestion: Which
figure of speech ...\\nOptions: (A) chiasmus (B) apostrophe"}, {"from": "gpt", "value": "The answer is
B."}]}``; image questions end in ``"\\n<image>"``), and so do the prompts in alibaba/conv-llava issue #2.
The same prompt for both sources (lmms-eval's ``sqa_doc_to_text`` writes a different one).
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
)
from tprl_ray.data.layout import DataError

SPLITS = {
    "llava": ("test", "val", "train", "minival", "minitest"),
    "lmms": ("test", "validation", "train"),
}

ANSWER_DIRECTLY = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDE"  # convert_sqa_to_llava_base_prompt.py's options
CONFIGS = (("ScienceQA-FULL", "full"), ("ScienceQA-IMG", "img"))


def records(src: Path, source: str, split: str, images: Path | None) -> Iterator[Item | Bad]:
    if source == "lmms":
        yield from _lmms(src, split)
    else:
        yield from _llava(src, split, images)


def prompt(question: str, hint: str, choices: list[str]) -> str:
    """LLaVA-1.5's ScienceQA prompt (``llava_test_CQM-A.json`` + ``--single-pred-prompt``)."""
    context = hint.strip() or "N/A"
    options = " ".join(f"({letter}) {choice}" for letter, choice in zip(LETTERS, choices))
    text = f"Context: {context}\nQuestion: {question}\nOptions: {options}\n".replace("  ", " ").strip()
    return text.replace("<image>", "").strip() + "\n" + ANSWER_DIRECTLY


def _problem(p, where: str, qid: str):
    """(text, answer letter, category, extra) of a problem, or :class:`Bad`."""
    if not isinstance(p, dict):
        return Bad(where, f"expected an object, got {type(p).__name__}", qid)
    if problem := missing_fields(p, ("question", "choices", "answer", "subject")):
        return Bad(where, problem, qid)
    choices, answer, hint = p["choices"], p["answer"], p.get("hint") or ""
    if not isinstance(p["question"], str) or not isinstance(hint, str) or not isinstance(p["subject"], str):
        return Bad(where, "question, hint and subject must be strings", qid)
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        return Bad(where, f"choices must be a list of 2 to {len(LETTERS)} strings", qid)
    if not all(isinstance(c, str) for c in choices):
        return Bad(where, "choices must be strings", qid)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        return Bad(where, f"answer {answer!r} is not the index of one of the {len(choices)} choices", qid)
    extra = {
        "options": dict(zip(LETTERS, choices)),
        "hint": hint,
        "grade": p.get("grade"),
        "topic": p.get("topic"),
    }
    return prompt(p["question"], hint, choices), LETTERS[answer], p["subject"], extra


# ----------------------------------------------------------------------------- llava


def _llava(src: Path, split: str, images: Path | None) -> Iterator[Item | Bad]:
    problems_file = find_file(src, "problems.json", "ScienceQA's problems file")
    splits_file = find_file(src, "pid_splits.json", "ScienceQA's split file")
    problems = read_json(problems_file)
    if not isinstance(problems, dict):
        raise DataError(f"{problems_file}: expected an object {{pid: problem}}")
    splits = read_json(splits_file)
    if not isinstance(splits, dict) or not isinstance(splits.get(split), list):
        have = ", ".join(splits) if isinstance(splits, dict) else "none"
        raise DataError(f"{splits_file}: no list of pids for split {split!r} (splits: {have})")
    folders: dict[str, Path] = {}  # a problem's split -> the folder of its <pid>/ image folders
    for pid in splits[split]:
        pid = str(pid)
        where = f"{problems_file}: problem '{pid}'"
        if pid not in problems:
            yield Bad(f"{splits_file}: {split} pid '{pid}'", f"problem {pid} is not in {problems_file.name}", pid)
            continue
        p = problems[pid]
        parsed = _problem(p, where, pid)
        if isinstance(parsed, Bad):
            yield parsed
            continue
        text, answer, category, extra = parsed
        image = p.get("image")
        if image is not None and not isinstance(image, str):
            yield Bad(where, f"image must be a file name or null, got {type(image).__name__}", pid)
            continue
        ref = None
        if image:
            if images is not None:
                folder = images
            else:
                own = str(p.get("split") or split)
                if own not in folders:
                    folders[own] = find_dir(src, (f"images/{own}", own), f"ScienceQA's {own} images")
                folder = folders[own]
            ref = ImageRef(path=folder / pid / image)
        yield Item(pid, text, category, answer, ref, where, extra)


# ----------------------------------------------------------------------------- lmms


def _lmms(src: Path, split: str) -> Iterator[Item | Bad]:
    found = None
    for config, tag in CONFIGS:
        try:
            found = parquet_files(src, split, config), tag
            break
        except DataError:
            continue
    files, tag = found or (parquet_files(src, split), "sqa")  # a folder of one config's files (or its error)
    for n, (where, row) in enumerate(parquet_rows(files)):
        qid = f"{tag}-{split}-{n}"
        parsed = _problem(row, where, qid)
        if isinstance(parsed, Bad):
            yield parsed
            continue
        text, answer, category, extra = parsed
        cell = row.get("image")
        empty = cell is None or (isinstance(cell, dict) and cell.get("bytes") is None and not cell.get("path"))
        image = None if empty else parquet_image(cell, where, qid)
        if isinstance(image, Bad):
            yield image
            continue
        yield Item(qid, text, category, answer, image, where, extra)
