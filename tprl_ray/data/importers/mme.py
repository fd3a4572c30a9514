"""MME from its official release folder, or from lmms-lab's Parquet.

MME asks two yes/no questions about each image (one answered yes, one no); its score per subtask is
acc (% of questions right) + acc+ (% of images with both right), so both questions of an image are
imported or neither. Imported: ``category`` the subtask, one of the 14 (10 perception, 4 cognition)
spelt as the scorer and MME's ``eval_tool`` spell them (``OCR``, ``commonsense_reasoning``, ...);
the image ``<subtask>/<file name>`` (e.g. ``artwork/10002.jpg``: unique across subtasks; the pairs are
grouped by it); ``question_id`` ``<image>#1`` and ``<image>#2``; ``answer`` "Yes" or "No" as the source
has it; ``text`` LLaVA-1.5's prompt: its ``llava_mme.jsonl`` drops MME's " Please answer yes or no."
and appends "\\nAnswer the question using a single word or phrase." (its
``convert_answer_to_mme.py`` undoes exactly that to find the answer); no ``extra``. One split,
``test``.

llava source (``--src`` the ``MME_Benchmark_release_version`` folder, as LLaVA's
``playground/data/eval/MME`` holds it; a nested ``MME_Benchmark/`` is found too; ``--images`` names the
folder itself): one folder per subtask, in one of two layouts (the one LLaVA's converter reads):

- ``artwork``, ``celebrity``, ``landmark``, ``posters``, ``scene``: ``images/<name>.jpg`` and
  ``questions_answers_YN/<name>.txt``;
- the others: ``<name>.jpg`` (or ``.png``) and ``<name>.txt`` side by side.

Each ``.txt`` has two lines ``question<TAB>answer`` (UTF-8), e.g. ``Is a python code shown in the
picture? Please answer yes or no.<TAB>Yes``. A line without exactly one tab or with an answer other
than yes/no, or a file without exactly two questions, is malformed (with the other question of its
pair); an image file that is not there is a missing image. Subtasks in MME's order (perception, then
cognition), files sorted by name.

lmms source (``lmms-lab/MME``, config ``default``, ``data/test-*.parquet``, 2,374 rows): columns
``question_id`` (the image's path, e.g. ``code_reasoning/0020.png``, shared by its two rows),
``image`` (``{bytes, path}``), ``question`` (with " Please answer yes or no."), ``answer`` (Yes/No),
``category`` (the subtask). The image name is ``<category>/<file name of question_id>``; an image
with other than two rows is malformed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from tprl_ray.data.config import MME_SUBTASKS
from tprl_ray.data.importers.common import (
    Bad,
    ImageRef,
    Item,
    missing_fields,
    parquet_files,
    parquet_image,
    parquet_rows,
)
from tprl_ray.data.layout import DataError

SPLITS = {"llava": ("test",), "lmms": ("test",)}
SUBTASKS = tuple(name for names in MME_SUBTASKS.values() for name in names)
MME_PHRASE = "Please answer yes or no."
SUFFIX = "\nAnswer the question using a single word or phrase."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def prompt(question: str) -> str:
    """LLaVA-1.5's MME prompt for one of MME's questions."""
    return question.replace(MME_PHRASE, "").strip() + SUFFIX


def records(src: Path, source: str, split: str, images: Path | None) -> Iterator[Item | Bad]:
    if source == "lmms":
        yield from _lmms(src)
    else:
        yield from _llava(images or src)


def _root(src: Path) -> Path:
    """The folder holding the subtask folders."""
    candidates = (src, src / "MME_Benchmark_release_version", src / "MME_Benchmark")
    candidates += (src / "MME_Benchmark_release_version" / "MME_Benchmark",)
    for root in candidates:
        if any((root / name).is_dir() for name in SUBTASKS):
            return root
    raise DataError(f"{src}: no MME subtask folder found (looked for {', '.join(SUBTASKS[:3])}, ... in it)")


def _llava(src: Path) -> Iterator[Item | Bad]:
    root = _root(src)
    for subtask in (name for name in SUBTASKS if (root / name).is_dir()):
        folder = root / subtask
        if (folder / "images").is_dir():
            image_dir, qa_dir = folder / "images", folder / "questions_answers_YN"
            if not qa_dir.is_dir():
                raise DataError(f"{folder}: has images/ but no questions_answers_YN/")
        else:
            image_dir = qa_dir = folder
        found = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        for txt in sorted(qa_dir.glob("*.txt")):
            path = found.get(txt.stem, image_dir / f"{txt.stem}.jpg")  # absent: a missing image
            yield from _pair(txt, subtask, ImageRef(name=f"{subtask}/{path.name}", path=path))


def _pair(txt: Path, subtask: str, image: ImageRef) -> Iterator[Item | Bad]:
    """The two questions of one ``.txt`` file, or why they cannot be used."""
    try:
        lines = txt.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        yield Bad(str(txt), f"not UTF-8 (byte {exc.object[exc.start]:#04x} at offset {exc.start})", image.name)
        return
    questions, bad = [], []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where, qid = f"{txt}:{lineno}", f"{image.name}#{len(questions) + len(bad) + 1}"
        parts = line.strip().split("\t")
        if len(parts) != 2:
            bad.append(Bad(where, f"expected 'question<TAB>answer', found {len(parts) - 1} tab(s)", qid))
        elif parts[1].strip().lower() not in ("yes", "no"):
            bad.append(Bad(where, f"answer {parts[1]!r} is not yes or no", qid))
        else:
            questions.append((where, qid, parts[0].strip(), parts[1].strip()))
    if bad or len(questions) != 2:
        yield from bad
        why = "the other question of its pair is malformed" if bad else f"{len(questions)} question(s), not a pair"
        for where, qid, _, _ in questions:
            yield Bad(where, f"{txt.name}: {why}", qid)
        if not questions and not bad:
            yield Bad(str(txt), "no question in it (MME has two per image)", image.name)
        return
    for where, qid, question, answer in questions:
        yield Item(qid, prompt(question), subtask, answer, image, where)


def _problem(row: dict) -> str:
    """Why an lmms-lab row is malformed ('' if it is not), images aside."""
    if problem := missing_fields(row, ("question_id", "question", "answer", "category")):
        return problem
    if row["category"] not in SUBTASKS:
        return f"unknown MME subtask {row['category']!r}"
    if not isinstance(row["question"], str) or not isinstance(row["answer"], str):
        return "question and answer must be strings"
    if row["answer"].strip().lower() not in ("yes", "no"):
        return f"answer {row['answer']!r} is not yes or no"
    return ""


def _lmms(src: Path) -> Iterator[Item | Bad]:
    files = parquet_files(src, "test")
    columns = ["question_id", "question", "answer", "category"]
    # First the text columns: a pair is imported only if both its rows are sound.
    pairs: dict[str, list[bool]] = {}
    for _, row in parquet_rows(files, columns):
        pairs.setdefault(str(row["question_id"] or ""), []).append(not _problem(row))
    seen: Counter = Counter()
    for where, row in parquet_rows(files, [*columns, "image"]):
        source_id = str(row["question_id"] or "")
        seen[source_id] += 1
        name = f"{row['category']}/{PurePosixPath(source_id).name}"
        qid = f"{name}#{seen[source_id]}"
        if problem := _problem(row):
            yield Bad(where, problem, qid)
            continue
        if len(pairs[source_id]) != 2:
            yield Bad(where, f"image {source_id!r} has {len(pairs[source_id])} question(s), not MME's pair of two", qid)
            continue
        if not all(pairs[source_id]):
            yield Bad(where, f"the other question of image {source_id!r} is malformed: its pair is broken", qid)
            continue
        image = parquet_image(row["image"], where, qid)
        if isinstance(image, Bad):
            yield image
            continue
        answer = row["answer"].strip()
        yield Item(qid, prompt(row["question"]), row["category"], answer, ImageRef(name, data=image.data), where)
