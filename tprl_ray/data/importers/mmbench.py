"""MMBench (English): LLaVA's ``mmbench_dev_20230712.tsv`` or lmms-lab's ``MMBench`` Parquet, one record
per CircularEval pass.

Sources
-------
``llava``: ``playground/data/eval/mmbench/mmbench_dev_20230712.tsv`` (LLaVA ``docs/Evaluation.md``; from
download.openmmlab.com), read by LLaVA's ``llava/eval/model_vqa_mmbench.py`` with ``pd.read_table``. ``--src``
is that folder or the file; other names looked for: ``mmbench_<split>_en_20231003.tsv``,
``MMBench_<SPLIT>_EN.tsv`` (VLMEvalKit). Tab-separated, a header line, one row per pass:

- ``index`` (int): the row's id. The file already holds the CircularEval passes: a question with N
  options has N rows, pass ``r`` with ``index = base + r * 1_000_000`` and its options (and answer) shifted
  ``r`` places (open-compass/MMBench issues #8 and #31; VLMEvalKit ``mcq_circular_eval`` groups rows by
  ``index % 1e6``). Kept: ``question_id = str(index)`` (the id LLaVA's answers and
  ``scripts/convert_mmbench_for_submission.py`` use), ``extra.index = index % 1_000_000`` (the question the
  scorer's CircularEval groups by), ``extra.round = index // 1_000_000``.
- ``question`` (str): the question. ``hint`` (str or empty/NaN): context, put before the question.
- ``A`` ``B`` ``C`` ``D`` (str or empty/NaN): the options; LLaVA stops at the first missing one (``get_options``),
  so a question has 2 to 4. Kept as ``extra.options`` ({letter: text}).
- ``answer`` (letter): kept as the answer; it must be one of the question's option letters. Only the dev
  file has it (test answers stay on MMBench's server): a file without answers is refused.
- ``category`` (str, the leaf ability, e.g. ``image_scene``): kept as ``category``.
- ``l2-category`` (str; spelled so in this file, LLaVA's submission script drops ``'l2-category'``): kept as
  ``extra.l2_category``.
- ``image`` (str): the base64 of the image (JPEG or PNG). VLMEvalKit's files store it once: a pass's cell
  may hold the ``index`` of the row with the bytes instead (64 characters or fewer). Written once per
  question as ``images/<index % 1e6>.<format>``.
- ``source``, ``comment``, ``split``: not kept.

"Missing" means what pandas reads as NaN (an empty cell, ``NA``, ``nan``, ``None``, ...) or LLaVA's
``is_none`` (the strings ``nan`` / ``none`` in any case).

A file without any ``index >= 1_000_000`` holds one row per question: each question is then expanded into
its N rotations the way ``model_vqa_mmbench.py --all-rounds`` does (``options = options[1:] + options[:1]``
per round, the answer letter following its option), ``question_id = f"{index}-{round}"``.

``lmms``: ``lmms-lab/MMBench`` (``lmms-lab-encoder/MMBench`` in newer lmms-eval), config ``en``, splits
``dev`` (4329 rows, with the CircularEval passes like the TSV) and ``test`` (no answers): the files in a
folder ``en`` (``en/<split>-NNNNN-of-NNNNN.parquet``). Columns as in the TSV except ``index`` (string in the
en config, int64 in others), ``L2-category`` (capital L) and ``image`` (a ``datasets`` Image:
``struct<bytes, path>``).

Prompt (``text``)
-----------------
As ``model_vqa_mmbench.py --single-pred-prompt`` builds it (without the image token, which the model adds):
``hint + "\\n"`` if there is a hint, the question, ``"\\nA. " + option`` per option, then ``"\\nAnswer with the
option's letter from the given choices directly."``. The same for both sources (lmms-eval's own prompt, with
"There are several options:", is not used).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tprl_ray.data.importers.common import (
    FORMATS,
    Bad,
    ImageRef,
    Item,
    find_file,
    parquet_files,
    parquet_rows,
    read_tsv,
)
from tprl_ray.data.layout import DataError

SPLITS = {"llava": ("dev", "test"), "lmms": ("dev", "test")}

LETTERS = "ABCD"  # LLaVA's all_options
OFFSET = 1_000_000  # index of pass r = index of the question + r * OFFSET
ANSWER_DIRECTLY = "Answer with the option's letter from the given choices directly."
# What pandas' read_table turns into NaN by default, plus LLaVA's is_none strings.
_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A"}
_NA |= {"NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
_REQUIRED = ("index", "question", "A", "B", "category", "image")
_DEV = "import the dev split"


def records(src: Path, source: str, split: str, images: Path | None) -> Iterator[Item | Bad]:
    if source == "lmms":
        files = parquet_files(src, split, "en")
        for path in files:
            _check_columns(path, _parquet_columns(path), split)

        def rows(columns=None):
            return ((where, row, "") for where, row in parquet_rows(files, columns))
    else:
        path = _tsv_file(src, split)
        _check_columns(path, _tsv_header(path), split)

        def rows(columns=None):
            return _tsv_rows(path)

    yield from _passes(rows, split)


def prompt(hint: str | None, question: str, options: list[str]) -> str:
    """The prompt of ``model_vqa_mmbench.py --single-pred-prompt`` (without the image token)."""
    text = question if hint is None else f"{hint}\n{question}"
    for letter, option in zip(LETTERS, options):
        text += f"\n{letter}. {option}"
    return f"{text}\n{ANSWER_DIRECTLY}"


def missing(value) -> bool:
    """A cell pandas reads as NaN, or that LLaVA's ``is_none`` calls empty."""
    if value is None:
        return True
    if isinstance(value, float):
        return value != value  # NaN
    return isinstance(value, str) and (value in _NA or value.lower() in ("nan", "none"))


# ----------------------------------------------------------------------------- the passes


def _passes(rows: Callable, split: str) -> Iterator[Item | Bad]:
    indices = (_index(row.get("index")) for _, row, _ in rows(["index"]))
    circular = any(index is not None and index >= OFFSET for index in indices)
    names: dict[int, str] = {}  # index of a row with image bytes -> its file name (for cells naming an index)
    answered = False
    for where, row, problem in rows():
        if problem:
            yield Bad(where, problem)
            continue
        index = _index(row.get("index"))
        if index is None:
            yield Bad(where, f"index {row.get('index')!r} is not a non-negative integer")
            continue
        qid = str(index)
        if split != "dev" and not answered and missing(row.get("answer")):
            raise DataError(f"{where}: question {index} has no answer (the {split} answers are not public: {_DEV})")
        answered = True
        parsed = _parse(row, where, qid)
        if isinstance(parsed, Bad):
            yield parsed
            continue
        hint, question, options, answer, category, l2 = parsed
        group = index % OFFSET
        image = _image(row.get("image"), group, index, names, where, qid)
        if isinstance(image, Bad):
            yield image
            continue
        extra = {"hint": hint, "l2_category": l2}
        if circular:
            extra = {"index": group, "round": index // OFFSET, "options": dict(zip(LETTERS, options)), **extra}
            yield Item(qid, prompt(hint, question, options), category, answer, image, where, extra)
            continue
        k = LETTERS.index(answer)
        for r in range(len(options)):  # model_vqa_mmbench.py --all-rounds
            shifted = options[r:] + options[:r]
            extra_r = {"index": index, "round": r, "options": dict(zip(LETTERS, shifted)), **extra}
            answer_r = LETTERS[(k - r) % len(options)]
            text = prompt(hint, question, shifted)
            yield Item(f"{index}-{r}", text, category, answer_r, image, where, extra_r)


def _parse(row: dict, where: str, qid: str):
    """(hint, question, options, answer, category, l2-category) of a row, or :class:`Bad`."""
    question = row.get("question")
    if missing(question) or not isinstance(question, str):
        return Bad(where, "the question is empty", qid)
    options = []
    for letter in LETTERS:
        value = row.get(letter)
        if missing(value):
            break
        options.append(str(value))
    if len(options) < 2:
        return Bad(where, f"{len(options)} option(s): a question needs at least A and B", qid)
    answer = row.get("answer")
    if missing(answer):
        return Bad(where, "no answer", qid)
    answer = str(answer).strip()
    if answer not in LETTERS[: len(options)]:
        return Bad(where, f"answer {answer!r} is not one of the options {', '.join(LETTERS[: len(options)])}", qid)
    category = row.get("category")
    if missing(category):
        return Bad(where, "no category", qid)
    hint = None if missing(row.get("hint")) else str(row["hint"])
    l2 = row.get("l2-category", row.get("L2-category"))
    return hint, question, options, answer, str(category), None if missing(l2) else str(l2)


def _index(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _image(cell, group: int, index: int, names: dict[int, str], where: str, qid: str) -> ImageRef | Bad | None:
    """The image of a row: decoded base64 (llava) or Parquet bytes (lmms), or the index of the row with them."""
    if not isinstance(cell, dict) and missing(cell):
        return None
    if isinstance(cell, dict):  # a datasets Image cell
        data = cell.get("bytes")
        if data is None:
            return None
        if not isinstance(data, bytes | bytearray):
            return Bad(where, f"image cell has no bytes (got {type(data).__name__})", qid)
        data = bytes(data)
    elif isinstance(cell, str):
        if len(cell) <= 64 and cell.strip().isdigit():  # VLMEvalKit: the image of the row with this index
            ref = int(cell.strip())
            return ImageRef(name=names[ref]) if ref in names else ImageRef(name=f"image-of-index-{ref}")
        try:
            data = base64.b64decode("".join(cell.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            return Bad(where, f"the image is not valid base64 ({exc})", qid)
    else:
        return Bad(where, f"the image cell is a {type(cell).__name__}, not base64 text", qid)
    try:
        with Image.open(io.BytesIO(data)) as img:
            suffix = FORMATS.get(img.format or "", ".img")
    except (UnidentifiedImageError, OSError, ValueError):
        return ImageRef(data=data)  # named by its digest; the writer rejects it as corrupt_image
    name = f"{group}{suffix}"
    names[index] = name
    return ImageRef(name=name, data=data)


# ----------------------------------------------------------------------------- files


def _tsv_file(src: Path, split: str) -> Path:
    if src.is_file():
        return src
    names = (f"mmbench_{split}_20230712.tsv", f"mmbench_{split}_en_20231003.tsv", f"MMBench_{split.upper()}_EN.tsv")
    for name in names:
        if (src / name).is_file():
            return src / name
    for name in names:
        if any(src.rglob(name)):
            return find_file(src, name, "MMBench file")
    raise DataError(f"{src}: MMBench {split} file not found (looked for {', '.join(names)}; --src may name the file)")


def _tsv_header(path: Path) -> list[str]:
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            return next(csv.reader(fh, delimiter="\t"), [])
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8") from None
    except (OSError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the header ({exc})") from None


def _tsv_rows(path: Path) -> Iterator[tuple[str, dict, str]]:
    """``(where, row, problem)`` per data row; ``problem`` set for a row whose fields do not match the header."""
    rows = read_tsv(path)
    while True:
        try:
            where, row = next(rows)
        except StopIteration:
            return
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8") from None
        except csv.Error as exc:
            raise DataError(f"{path}: not a readable TSV file ({exc})") from None
        if None in row:
            yield where, row, f"{len(row) - 1 + len(row[None])} fields, more than the header's {len(row) - 1}"
        elif None in row.values():
            yield where, row, f"{sum(v is not None for v in row.values())} fields, fewer than the header's {len(row)}"
        else:
            yield where, row, ""


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).names
    except Exception as exc:  # ArrowInvalid / OSError for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None


def _check_columns(path: Path, columns: list[str], split: str) -> None:
    if "answer" not in columns:
        raise DataError(f"{path}: no answer column (MMBench's test answers are kept on its evaluation server: {_DEV})")
    if absent := [c for c in _REQUIRED if c not in columns]:
        raise DataError(f"{path}: missing column(s) {', '.join(absent)} (columns: {', '.join(columns)})")
