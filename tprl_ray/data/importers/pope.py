"""POPE (MSCOCO) from LLaVA's question file and POPE's label files, or from lmms-lab's Parquet.

Imported: ``category`` the POPE split (adversarial, popular, random: the scorer reports F1 per split and
their mean), ``answer`` "yes" or "no", ``text`` the question + "\\nAnswer the question using a single
word or phrase." (LLaVA-1.5's prompt); COCO val2014 images, each written once. ``--split`` is ``all``
(the default: the three splits, as LLaVA evaluates them) or one of them.

llava source (``--src`` LLaVA's ``playground/data/eval/pope``):

- ``llava_pope_test.jsonl`` (LLaVA's ``eval.zip``), 8,910 lines ``{"question_id": 1, "image":
  "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?\\nAnswer the question
  using a single word or phrase.", "category": "adversarial"}``: adversarial (ids 1..3000), then random
  (10000001..10002910), then popular (20000001..20003000). All four fields kept (``question_id`` as a
  string, ``text`` as is).
- ``coco/coco_pope_{adversarial,popular,random}.json``, POPE's labels (JSON lines ``{"question_id": 1,
  "image": ..., "text": "Is there a snowboard in the image?", "label": "yes"}``): the ``label`` is the
  answer. LLaVA's ``llava/eval/eval_pope.py`` links them BY ORDER: the i-th question of category c in
  the question file (answers follow its order) is the i-th line of ``coco_pope_c.json``. That link is
  kept, and checked: the label line must name the same ``image`` and its ``text`` must be the first line
  of the question's. A question without a label line, a mismatch, or label lines left over are
  malformed: the label files must be the ones LLaVA evaluates (POPE commit e3e3926, ``output/coco``;
  POPE's later spelling fixes change texts, and its later random split has 3,000 questions, not 2,910).
  A malformed line in the question file breaks the link of its category; the checks then reject the
  questions after it rather than link them wrongly.
- images: COCO val2014 (``val2014/`` in LLaVA's layout, or ``--images``), ``image`` the file name.

lmms source (``lmms-lab/POPE``): config ``default`` (``data/test-*.parquet``, 9,000 rows, the three
splits) or ``Full`` (``Full/{adversarial,popular,random}-*.parquet``); columns ``id`` (not kept),
``question_id`` (kept as ``<category>/<question_id>``, unique even where each split is numbered from
1 as in POPE's files), ``question``, ``answer``, ``image_source`` (the COCO image's name: the image is
written once under it, though every row repeats its bytes), ``image`` (``{bytes, path}``),
``category`` (must be one of the three splits).
``all`` reads ``default`` (else the three ``Full`` splits), a single split reads ``Full`` (else the rows
of ``default`` in that category).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePosixPath

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
    read_jsonl,
)
from tprl_ray.data.layout import DataError

CATEGORIES = ("adversarial", "popular", "random")
SPLITS = {"llava": ("all", *CATEGORIES), "lmms": ("all", *CATEGORIES)}
SUFFIX = "\nAnswer the question using a single word or phrase."
LABELS = ("yes", "no")
PINNED = "POPE's coco files must be the ones LLaVA evaluates (POPE commit e3e3926)"


def records(src: Path, source: str, split: str, images: Path | None) -> Iterator[Item | Bad]:
    if source == "lmms":
        yield from _lmms(src, split)
    else:
        yield from _llava(src, split, images)


def _llava(src: Path, split: str, images: Path | None) -> Iterator[Item | Bad]:
    qpath = find_file(src, "llava_pope_test.jsonl", "LLaVA's POPE question file")
    wanted = CATEGORIES if split == "all" else (split,)
    paths = {c: find_file(src, f"coco/coco_pope_{c}.json", f"POPE's {c} label file") for c in wanted}
    image_dir = images or find_dir(src, ("val2014", "coco/val2014", "images/val2014"), "COCO's val2014 images")
    labels = {c: read_jsonl(path) for c, path in paths.items()}
    for where, row, problem in read_jsonl(qpath):
        if row is None:
            yield Bad(where, problem)
            continue
        qid = str(row.get("question_id", ""))
        if problem := missing_fields(row, ("question_id", "image", "text", "category")):
            yield Bad(where, problem, qid)
            continue
        category = row["category"]
        if category not in CATEGORIES:
            yield Bad(where, f"unknown category {category!r} (POPE's are {', '.join(CATEGORIES)})", qid)
            continue
        if category not in wanted:
            continue
        label = next(labels[category], None)
        if label is None:
            yield Bad(where, f"no label left for it in {paths[category]}: that file has fewer lines; {PINNED}", qid)
            continue
        yield _linked(row, qid, where, label, image_dir)
    for category, rest in labels.items():
        extra = sum(1 for _ in rest)
        if extra:
            yield Bad(
                f"{paths[category]}: last {extra} line(s)",
                f"{extra} label(s) have no {category} question in {qpath.name} to link to; {PINNED}",
            )


def _linked(row: dict, qid: str, where: str, label: tuple[str, dict | None, str], image_dir: Path) -> Item | Bad:
    """The question ``row`` with its answer from the label line linked to it by order, or why not."""
    lwhere, lrow, problem = label
    if lrow is None:
        return Bad(where, f"its label {lwhere} is malformed ({problem})", qid)
    if problem := missing_fields(lrow, ("image", "text", "label")):
        return Bad(where, f"its label {lwhere}: {problem}", qid)
    if not isinstance(row["text"], str) or not isinstance(row["image"], str):
        return Bad(where, "text and image must be strings", qid)
    if lrow["label"] not in LABELS:
        return Bad(where, f"its label {lwhere} is {lrow['label']!r}, not yes or no", qid)
    question = row["text"].split("\n", 1)[0].strip()
    if lrow["image"] != row["image"] or str(lrow["text"]).strip() != question:
        return Bad(
            where,
            f"does not match its label {lwhere} (linked by order): {row['image']!r} {question!r} vs "
            f"{lrow['image']!r} {lrow['text']!r}; {PINNED}",
            qid,
        )
    image = ImageRef(name=row["image"], path=image_dir / row["image"])
    return Item(qid, row["text"], row["category"], lrow["label"], image, where)


def _lmms_files(src: Path, split: str) -> tuple[list[Path], str | None]:
    """The Parquet files of ``split`` and the category to keep of their rows (None: all)."""
    if split == "all":
        try:
            return parquet_files(src, "test"), None
        except DataError as exc:
            try:
                return [p for c in CATEGORIES for p in parquet_files(src, c, "Full")], None
            except DataError:
                raise exc from None
    try:
        return parquet_files(src, split, "Full"), split
    except DataError as exc:
        try:
            return parquet_files(src, "test"), split
        except DataError:
            raise exc from None


def _lmms(src: Path, split: str) -> Iterator[Item | Bad]:
    files, keep = _lmms_files(src, split)
    columns = ["question_id", "question", "answer", "image_source", "image", "category"]
    for where, row in parquet_rows(files, columns):
        if problem := missing_fields(row, tuple(columns)):
            yield Bad(where, problem, str(row.get("question_id") or ""))
            continue
        category = row["category"]
        qid = f"{category}/{row['question_id']}"
        if category not in CATEGORIES:
            yield Bad(where, f"unknown category {category!r} (POPE's are {', '.join(CATEGORIES)})", qid)
            continue
        if keep and category != keep:
            continue
        if not all(isinstance(row[k], str) for k in ("question", "answer", "image_source")):
            yield Bad(where, "question, answer and image_source must be strings", qid)
            continue
        answer = row["answer"].strip().lower()
        if answer not in LABELS:
            yield Bad(where, f"answer {row['answer']!r} is not yes or no", qid)
            continue
        image = parquet_image(row["image"], where, qid)
        if isinstance(image, Bad):
            yield image
            continue
        name = PurePosixPath(row["image_source"].strip()).name
        name = name if PurePosixPath(name).suffix else f"{name}.jpg"  # COCO's images are JPEG
        yield Item(qid, row["question"].strip() + SUFFIX, category, answer, ImageRef(name=name, data=image.data), where)
