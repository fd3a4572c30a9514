"""GQA (balanced) from LLaVA's question file plus GQA's own files, or from lmms-lab's Parquet.

Imported: ``question_id`` GQA's question id (a string), ``text`` the prompt LLaVA-1.5 feeds,
``category`` the structural type (verify, query, choose, logical, compare: GQA ``eval.py`` reports
accuracy per structural type), ``answer`` GQA's short answer (scored by exact match after LLaVA's
``rstrip('.').lower()``), ``extra`` ``semantic`` and ``detailed`` (the other two types) and
``full_answer``; the image ``<imageId>.jpg``.

llava source (``--src`` LLaVA's ``playground/data/eval/gqa`` or GQA's own download):

- ``testdev`` (default; what LLaVA-1.5 evaluates, ``scripts/v1_5/eval/gqa.sh``):
  ``llava_gqa_testdev_balanced.jsonl`` (from LLaVA's ``eval.zip``), 12,578 lines
  ``{"question_id": "201307251", "image": "n161313.jpg", "text": "Is it overcast?\\nAnswer the question
  using a single word or phrase.", "category": "default"}``; ``question_id``, ``image`` and ``text`` are
  kept (``text`` as is), ``category`` ("default" everywhere) is replaced by the structural type. The
  answer and types come from GQA's ``testdev_balanced_questions.json`` (questions1.2; LLaVA keeps it
  in ``gqa/data/``), found by the question id; a question not there, or whose ``image`` is not that
  entry's ``imageId`` + ``.jpg``, is malformed.
- ``train``, ``val``: GQA's ``{split}_balanced_questions.json`` alone; the prompt is built as LLaVA's
  file has it: ``question`` + "\\nAnswer the question using a single word or phrase.".

GQA's question files are one JSON object ``{question_id: entry}``; an entry's fields: ``question``,
``imageId`` (the image is ``images/<imageId>.jpg``), ``answer`` (kept), ``fullAnswer`` (kept as
``full_answer``), ``types`` ``{structural, semantic, detailed}`` (kept), ``isBalanced`` (true in these
files), ``groups`` ``{global, local}``, ``entailed``, ``equivalent``, ``annotations``, ``semantic`` (the
program) and ``semanticStr`` (not kept). Images: GQA's ``images/`` folder, ``data/images`` in LLaVA's
layout, or ``--images``.

lmms source (``lmms-lab/GQA``): the questions and the images are separate configs, joined by image id.
``{split}_balanced_instructions/{split}-*.parquet`` (splits ``testdev``, ``val``, ``train``) has GQA's
entry fields as columns (``id`` the question id, ``imageId``, ``question``, ``answer``, ``fullAnswer``,
``isBalanced``, ``groups``, ``entailed``, ``equivalent``, ``types`` a struct, ``annotations``,
``semantic``, ``semanticStr``) and no image; ``{split}_balanced_images/{split}-*.parquet`` has ``id``
(the image id) and ``image`` (``{bytes, path}``). The prompt is built as above. The image files are
indexed by id first; an image's bytes are read (by row group, a few cached) for its first question only.
A question whose image id is in no images file is counted as a missing image.
"""

from __future__ import annotations

from collections import OrderedDict
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

SPLITS = {"llava": ("testdev", "val", "train"), "lmms": ("testdev", "val", "train")}
SUFFIX = "\nAnswer the question using a single word or phrase."
LLAVA_FILE = "llava_gqa_testdev_balanced.jsonl"


def records(src: Path, source: str, split: str, images: Path | None) -> Iterator[Item | Bad]:
    if source == "lmms":
        yield from _lmms(src, split)
    else:
        yield from _llava(src, split, images)


def _entry(entry, where: str, qid: str) -> tuple[str, str, str, dict] | Bad:
    """(question, imageId, answer, extra plus category) of one GQA question entry, or why it is malformed."""
    if not isinstance(entry, dict):
        return Bad(where, f"expected an object, got {type(entry).__name__}", qid)
    if problem := missing_fields(entry, ("question", "imageId", "answer", "types")):
        return Bad(where, problem, qid)
    types = entry["types"]
    if isinstance(types, list) and len(types) == 1:  # an early lmms-lab upload stored it as a 1-list
        types = types[0]
    if not isinstance(types, dict) or not isinstance(types.get("structural"), str):
        return Bad(where, "types.structural missing or not a string", qid)
    if not all(isinstance(entry[k], str) for k in ("question", "imageId", "answer")):
        return Bad(where, "question, imageId and answer must be strings", qid)
    extra = {
        "category": types["structural"],
        "semantic": types.get("semantic"),
        "detailed": types.get("detailed"),
        "full_answer": entry.get("fullAnswer"),
    }
    return entry["question"], entry["imageId"], entry["answer"], extra


def _item(qid: str, text: str, fields: tuple, image: ImageRef, where: str) -> Item:
    _, _, answer, extra = fields
    extra = dict(extra)
    category = extra.pop("category")
    return Item(qid, text, category, answer, image, where, extra)


def _llava(src: Path, split: str, images: Path | None) -> Iterator[Item | Bad]:
    path = find_file(src, f"{split}_balanced_questions.json", "GQA's question file")
    official = read_json(path)
    if not isinstance(official, dict):
        raise DataError(f"{path}: expected a JSON object of question id -> question")
    image_dir = images or find_dir(src, ("data/images", "images"), "GQA's image folder")
    if split != "testdev":
        for qid, entry in official.items():
            where = f"{path}: question {qid!r}"
            fields = _entry(entry, where, qid)
            if isinstance(fields, Bad):
                yield fields
                continue
            name = f"{fields[1]}.jpg"
            yield _item(qid, fields[0] + SUFFIX, fields, ImageRef(name=name, path=image_dir / name), where)
        return
    for where, row, problem in read_jsonl(find_file(src, LLAVA_FILE, "LLaVA's GQA question file")):
        if row is None:
            yield Bad(where, problem)
            continue
        if problem := missing_fields(row, ("question_id", "image", "text")):
            yield Bad(where, problem, str(row.get("question_id", "")))
            continue
        qid = str(row["question_id"])
        if not isinstance(row["text"], str) or not isinstance(row["image"], str):
            yield Bad(where, "text and image must be strings", qid)
            continue
        if qid not in official:
            yield Bad(where, f"question {qid} is not in {path}", qid)
            continue
        fields = _entry(official[qid], f"{where} ({path.name}: question {qid!r})", qid)
        if isinstance(fields, Bad):
            yield fields
            continue
        if row["image"] != f"{fields[1]}.jpg":
            yield Bad(where, f"image {row['image']!r} is not imageId {fields[1]!r} of {path.name}", qid)
            continue
        yield _item(qid, row["text"], fields, ImageRef(name=row["image"], path=image_dir / row["image"]), where)


def _column(reader, path: Path, group: int, column: str) -> list:
    """One column of one row group; a one-line error naming the file if it cannot be read."""
    try:
        return reader.read_row_group(group, columns=[column]).column(column).to_pylist()
    except Exception as exc:  # a truncated or corrupt page: pyarrow's OSError / ArrowInvalid
        raise DataError(f"{path}: row group {group}: unreadable ({str(exc).splitlines()[0]})") from None


class _ImageIndex:
    """The images config of lmms-lab/GQA: id -> (file, row group, row), bytes read by row group."""

    def __init__(self, files: list[Path], cached_groups: int = 4):
        import pyarrow.parquet as pq

        self.files, self.where, self.cache, self.size = [], {}, OrderedDict(), cached_groups
        self.paths = list(files)
        self.given: set[str] = set()
        for path in files:
            try:
                reader = pq.ParquetFile(path)
            except Exception as exc:  # ArrowInvalid / OSError: not Parquet
                raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
            if missing := [c for c in ("id", "image") if c not in reader.schema_arrow.names]:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
            self.files.append(reader)
            for group in range(reader.num_row_groups):
                ids = _column(reader, path, group, "id")
                for row, image_id in enumerate(ids):
                    self.where.setdefault(str(image_id), (len(self.files) - 1, group, row))

    def ref(self, image_id: str, where: str) -> ImageRef | Bad:
        """The image of ``image_id``: its bytes the first time, its name after (the writer has it then)."""
        name = f"{image_id}.jpg"
        if image_id in self.given or image_id not in self.where:
            return ImageRef(name=name)  # written already, or counted missing by the writer
        file, group, row = self.where[image_id]
        key = (file, group)
        if key not in self.cache:
            self.cache[key] = _column(self.files[file], self.paths[file], group, "image")
            if len(self.cache) > self.size:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        image = parquet_image(self.cache[key][row], f"{where} (image {image_id!r})")
        if isinstance(image, Bad):
            return image
        self.given.add(image_id)
        return ImageRef(name=name, data=image.data)


def _lmms(src: Path, split: str) -> Iterator[Item | Bad]:
    questions = parquet_files(src, split, f"{split}_balanced_instructions")
    index = _ImageIndex(parquet_files(src, split, f"{split}_balanced_images"))
    columns = ["id", "imageId", "question", "answer", "fullAnswer", "types"]
    seen: set[str] = set()
    for where, row in parquet_rows(questions, columns):
        qid = str(row["id"] or "")
        fields = _entry(row, where, qid)
        if isinstance(fields, Bad):
            yield fields
            continue
        # The writer rejects an empty or repeated id before it looks at the image: no bytes for those.
        image = index.ref(fields[1], where) if qid and qid not in seen else ImageRef(name=f"{fields[1]}.jpg")
        seen.add(qid)
        if isinstance(image, Bad):
            yield Bad(image.where, image.reason, qid)
            continue
        yield _item(qid, fields[0] + SUFFIX, fields, image, where)
