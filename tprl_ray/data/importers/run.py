"""`tprl data import`: one benchmark split from its own files into this project's layout, streamed.

``OUT/import.json`` holds what was imported from where and the counts. A re-run with the same
benchmark, source, split, images, limit and leniency finds it and returns its summary; any other
setting on the same ``OUT`` is refused. An import that did not finish (killed, or stopped by a
malformed record) can be run again with any settings (``--lenient`` for one); the images it wrote
are kept and not written again when they come from the same source.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from tprl_ray.artifacts.atomic import atomic_write_bytes
from tprl_ray.artifacts.outputs import check_writable
from tprl_ray.artifacts.resume import refuse_other_settings
from tprl_ray.data.config import ImportConfig
from tprl_ray.data.importers.common import IMPORT_VERSION, SplitWriter, is_parquet_source
from tprl_ray.data.layout import DataError

SOURCE = ("version", "benchmark", "source", "src", "split", "images")  # what decides the images written


def importer(benchmark: str):
    """The module that reads ``benchmark``."""
    return importlib.import_module(f"tprl_ray.data.importers.{benchmark}")


def resolve(cfg: ImportConfig) -> tuple[str, str]:
    """The source kind (``llava`` or ``lmms``) and the split to import, checked against the importer."""
    if cfg.src is None:
        raise DataError(f"{cfg.benchmark}: give the source with --src PATH")
    if not cfg.src.exists():
        raise DataError(f"{cfg.src}: source not found")
    source = cfg.source if cfg.source != "auto" else ("lmms" if is_parquet_source(cfg.src) else "llava")
    splits = importer(cfg.benchmark).SPLITS[source]
    split = cfg.split or splits[0]
    if split not in splits:
        raise DataError(f"{cfg.benchmark} from {source}: unknown split {split!r} (available: {', '.join(splits)})")
    return source, split


def run_import(cfg: ImportConfig, progress: bool = True) -> dict:
    """Import one split; the summary: imported questions, images, rejected per reason."""
    source, split = resolve(cfg)
    identity = {
        "version": IMPORT_VERSION,
        "benchmark": cfg.benchmark,
        "source": source,
        "src": str(cfg.src.resolve()),
        "split": split,
        "images": str(cfg.images.resolve()) if cfg.images else None,
        "lenient": cfg.lenient,
        "limit": cfg.limit,
    }
    manifest = cfg.out / "import.json"
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        if old.get("summary") is not None:  # a finished import: the same one is done, another is refused
            refuse_other_settings({k: old.get(k) for k in identity}, identity, cfg.out, "import")
            if (cfg.out / "questions.jsonl").is_file():
                return {**old["summary"], "skipped": True}
        elif any(old.get(k) != identity[k] for k in SOURCE):  # an unfinished one from elsewhere: its images go
            shutil.rmtree(cfg.out / "images", ignore_errors=True)
    check_writable(cfg.out)
    atomic_write_bytes(manifest, json.dumps({**identity, "summary": None}, indent=2).encode())
    writer = SplitWriter(cfg.out, cfg.lenient)
    records = importer(cfg.benchmark).records(cfg.src, source, split, cfg.images)
    bar = tqdm(desc=f"import {cfg.benchmark}", unit=" records", disable=not progress)
    try:
        for n, record in enumerate(records):
            if cfg.limit and n >= cfg.limit:
                break
            writer.add(record)
            bar.update(1)
        summary = writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    atomic_write_bytes(manifest, json.dumps({**identity, "summary": summary}, indent=2).encode())
    return summary


def command(cfg: ImportConfig) -> None:
    """`tprl data import`: the summary, one line per count."""
    summary = run_import(cfg)
    if summary.pop("skipped", False):
        print(f"[import] {cfg.out} is already imported with these settings")
    for key, value in summary.items():
        print(f"{key:>24}: {value}")
    if any(k.startswith("rejected_") for k in summary):
        print(f"rejected questions and their reasons: {Path(cfg.out) / 'rejects.jsonl'}")
    print(f"wrote {cfg.out}")
