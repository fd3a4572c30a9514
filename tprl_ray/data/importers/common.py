"""What every importer shares: the records it yields, the split writer, and readers of the source files.

An importer is a module with ``SPLITS`` (the source splits it knows, the first the default) and
``records(src, source, split, images) -> Iterator[Item | Bad]``, which streams the benchmark's
records in the source's order. The :class:`SplitWriter` turns them into a split in this project's
layout (:mod:`tprl_ray.data.layout`): each image is written once under ``images/`` (copied, or the
decoded bytes, named by the source or by the content's digest), questions and answers are streamed
to temporary files renamed into place at the end, and every left-out record is in ``rejects.jsonl``
with its reason. ``import.json`` records the source and the counts; a re-run with the same settings
finds it and does nothing, a killed run leaves its images, which the next run does not write again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tprl_ray.artifacts.atomic import atomic_write_bytes, remove_leftovers
from tprl_ray.data.layout import DataError

IMPORT_VERSION = 1
FORMATS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}


@dataclass(frozen=True)
class ImageRef:
    """Where a question's image comes from: a file to copy (``path``) or encoded bytes (``data``),
    written as ``name`` (a relative path; None: the digest of its bytes plus the format's suffix)."""

    name: str | None = None
    path: Path | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class Item:
    """One imported question. ``where`` names its file and record for messages; ``image`` None is a
    question without an image (rejected as ``no_image``: the benchmarks here are visual)."""

    question_id: str
    text: str
    category: str
    answer: str | list[str]
    image: ImageRef | None
    where: str
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Bad:
    """A malformed record: ``where`` (file and record), why; an error unless the import is lenient."""

    where: str
    reason: str
    question_id: str = ""


class SplitWriter:
    """Writes one split from a stream of :class:`Item` and :class:`Bad`; see the module docstring."""

    def __init__(self, out: Path, lenient: bool):
        self.out, self.lenient = Path(out), lenient
        self.images = self.out / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        for directory in (self.out, self.images, *(p for p in self.images.rglob("*") if p.is_dir())):
            remove_leftovers(directory)  # what a killed run was writing
        self.written: dict[str, str] = {}  # image key (source name or digest) -> file name in images/
        self.broken: dict[str, tuple[str, str]] = {}  # image key -> (reason, detail): why it cannot be used
        self.ids: set[str] = set()
        self.counts: Counter = Counter()
        self.files = {
            name: open(self.out / f".{name}.partial", "w", encoding="utf-8")  # noqa: SIM115 (closed in finish)
            for name in ("questions.jsonl", "answers.jsonl", "rejects.jsonl")
        }

    def add(self, record: Item | Bad) -> None:
        if isinstance(record, Bad):
            if not self.lenient:
                raise DataError(f"{record.where}: {record.reason}")
            self.reject(record.question_id, record.where, "malformed", record.reason)
            return
        if not record.question_id or record.question_id in self.ids:
            why = "an empty question id" if not record.question_id else f"duplicate question id {record.question_id!r}"
            self.add(Bad(record.where, why, record.question_id))
            return
        if record.image is None:
            self.reject(record.question_id, record.where, "no_image", "the question has no image")
            return
        name, problem = self.image(record.image)
        if problem:
            self.reject(record.question_id, record.where, problem[0], problem[1])
            return
        self.ids.add(record.question_id)
        row = {"question_id": record.question_id, "image": name, "text": record.text, "category": record.category}
        self._line("questions.jsonl", {**row, **record.extra})
        self._line("answers.jsonl", {"question_id": record.question_id, "answer": record.answer})
        self.counts["imported"] += 1

    def image(self, ref: ImageRef) -> tuple[str, tuple[str, str] | None]:
        """The file name of ``ref`` under ``images/`` (written now if it is new), or the reason it cannot
        be used: ``missing_image`` or ``corrupt_image`` with a detail."""
        key = ref.name or ""
        if ref.path is not None and ref.name is None:
            key = str(ref.path)
        if key and key in self.written:
            return self.written[key], None
        if key and key in self.broken:
            return "", self.broken[key]
        if ref.data is None and (ref.path is None or not ref.path.is_file()):
            self.broken[key] = ("missing_image", f"image {ref.path or ref.name} not found")
            return "", self.broken[key]
        data = ref.data if ref.data is not None else ref.path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as img:
                suffix = FORMATS.get(img.format or "", ".img")
                img.verify()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
            problem = ("corrupt_image", f"image {ref.path or ref.name or 'bytes'} cannot be decoded ({exc})")
            if key:
                self.broken[key] = problem
            return "", problem
        name = ref.name or f"{hashlib.sha256(data).hexdigest()[:20]}{suffix}"
        if not key:
            key = name
        target = self.images / name
        if not target.resolve().is_relative_to(self.images.resolve()):
            raise DataError(f"image name {name!r} leaves the images folder")
        if not target.is_file():  # written by an earlier, killed run otherwise (atomically: it is whole)
            atomic_write_bytes(target, data)
            self.counts["images_written"] += 1
        self.written[key] = name
        return name, None

    def reject(self, question_id: str, where: str, reason: str, detail: str) -> None:
        self._line("rejects.jsonl", {"question_id": question_id, "where": where, "reason": reason, "detail": detail})
        self.counts[f"rejected_{reason}"] += 1

    def _line(self, name: str, row: dict) -> None:
        self.files[name].write(json.dumps(row, ensure_ascii=False) + "\n")

    def finish(self) -> dict:
        """Rename the streamed files into place (rejects first, the answers, the questions last)."""
        for name in ("rejects.jsonl", "answers.jsonl", "questions.jsonl"):
            fh = self.files[name]
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            os.replace(self.out / f".{name}.partial", self.out / name)
        if not self.counts["imported"]:
            raise DataError(f"{self.out}: no question was imported ({self.reasons() or 'the source is empty'})")
        counts = {"imported": self.counts["imported"], "images": len(set(self.written.values()))}
        return {**counts, "rejected_missing_image": self.counts["rejected_missing_image"], **self.rejected()}

    def abort(self) -> None:
        for name, fh in self.files.items():
            fh.close()
            (self.out / f".{name}.partial").unlink(missing_ok=True)

    def rejected(self) -> dict[str, int]:
        return {k: v for k, v in sorted(self.counts.items()) if k.startswith("rejected_") and v}

    def reasons(self) -> str:
        return ", ".join(f"{k.removeprefix('rejected_')}: {v}" for k, v in self.rejected().items())


# ----------------------------------------------------------------------------- reading source files


def find_file(src: Path, name: str, what: str) -> Path:
    """``src/name`` if it exists, else the one file called ``name``'s base name below ``src``."""
    direct = src / name
    if direct.is_file():
        return direct
    found = sorted(src.rglob(Path(name).name)) if src.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise DataError(f"{src}: {what} {Path(name).name} not found (expected at {direct})")
    raise DataError(f"{src}: several files called {Path(name).name} ({', '.join(map(str, found[:3]))}); pass one")


def find_dir(src: Path, candidates: tuple[str, ...], what: str) -> Path:
    """The first of ``src/candidate`` that is a directory."""
    for name in candidates:
        if (src / name).is_dir():
            return src / name
    raise DataError(f"{src}: {what} not found (looked for {', '.join(candidates)}; --images DIR names it)")


def read_json(path: Path):
    """A whole JSON file; a one-line error naming it if it does not parse."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None


def read_jsonl(path: Path) -> Iterator[tuple[str, dict | None, str]]:
    """``(where, row, problem)`` per non-empty line: ``row`` None and ``problem`` set for a bad line."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield where, None, "not UTF-8"
                continue
            except json.JSONDecodeError as exc:
                yield where, None, f"malformed JSON ({exc.msg})"
                continue
            if not isinstance(row, dict):
                yield where, None, "expected a JSON object"
                continue
            yield where, row, ""


def read_tsv(path: Path) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` per data row of a tab-separated file with a header (fields may be huge: base64)."""
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        for row in reader:
            yield f"{path}:{reader.line_num}", row


def missing_fields(row: dict, fields: tuple[str, ...]) -> str:
    """'' if ``row`` has every field, else the reason naming the missing ones."""
    missing = [f for f in fields if f not in row or row[f] is None]
    return f"missing field(s) {', '.join(missing)}" if missing else ""


def parquet_files(src: Path, split: str, config: str | None = None) -> list[Path]:
    """The Parquet files of one split of a Hugging Face dataset under ``src`` (a snapshot folder, the
    ``datasets--org--name`` folder of the hub cache, or any folder holding the files): named
    ``<split>-NNNNN-of-NNNNN.parquet`` or ``<split>.parquet``, in a ``config`` sub-folder if given; the
    snapshot ``refs/main`` names (else the newest) when there are several."""
    if not src.is_dir():
        raise DataError(f"{src}: not a directory")
    root = src
    if (src / "snapshots").is_dir():  # the hub cache: the snapshot refs/main names, else the newest
        main = src / "refs" / "main"
        named = src / "snapshots" / main.read_text().strip() if main.is_file() else None
        snapshots = sorted((src / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
        root = named if named is not None and named.is_dir() else snapshots[-1] if snapshots else src

    def matches(path: Path) -> bool:
        stem = path.name.removesuffix(".parquet")
        in_config = config is None or config in path.relative_to(root).parts[:-1]
        return in_config and (stem == split or stem.startswith(f"{split}-"))

    found = sorted(p for p in root.rglob("*.parquet") if matches(p))
    if not found:
        where = f" in {config}/" if config else ""
        have = sorted({p.name.split("-")[0].removesuffix(".parquet") for p in root.rglob("*.parquet")})
        raise DataError(
            f"{root}: no Parquet files of split {split!r}{where} (splits found: {', '.join(have) or 'none'})"
        )
    return found


def parquet_rows(files: list[Path], columns: list[str] | None = None) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` per row of the files, read in record batches (``where``: file and row number)."""
    import pyarrow.parquet as pq

    for path in files:
        try:
            reader = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
        names = reader.schema_arrow.names
        if columns and (missing := [c for c in columns if c not in names]):
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (columns: {', '.join(names)})")
        row_number = 0
        batches = reader.iter_batches(batch_size=256, columns=columns)
        while True:
            try:
                batch = next(batches, None)
            except Exception as exc:  # a truncated or corrupt page: pyarrow's OSError / ArrowInvalid
                raise DataError(f"{path}: row {row_number}: unreadable ({str(exc).splitlines()[0]})") from None
            if batch is None:
                break
            for row in batch.to_pylist():
                yield f"{path}: row {row_number}", row
                row_number += 1


def parquet_image(value, where: str, question_id: str = "") -> ImageRef | Bad:
    """An image cell of a Hugging Face dataset (``{"bytes": ..., "path": ...}``) as an :class:`ImageRef`
    named by its digest (the ``path`` of such datasets is often the same for every row)."""
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes | bytearray):
        return ImageRef(data=bytes(value["bytes"]))
    return Bad(where, f"image cell has no bytes (got {type(value).__name__})", question_id)


def is_parquet_source(src: Path) -> bool:
    return src.is_dir() and next(src.rglob("*.parquet"), None) is not None
