"""Atomic writers: a reader sees the old file or the new one, never half of one. A killed writer
leaves its temporary behind; a stage removes those of its directories on start (:func:`remove_leftovers`)."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

TEMPORARIES = (".*.tprl-*.tmp",)  # the names of atomic_write_bytes' temporaries


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tprl-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide outputs from the other users of a shared store
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_dir(path: Path, write) -> None:
    """``write(tmp)`` fills a temporary directory beside ``path``, which then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tprl-", suffix=".tmp"))
    old = tmp.with_name(f".{path.name}.tprl-old.tmp")
    try:
        tmp.chmod(0o755)
        write(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_parquet(table, path: Path) -> None:
    """A pyarrow table as one Parquet file, atomically."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


def remove_leftovers(directory: Path, patterns: Iterable[str] = TEMPORARIES, keep: Iterable[str] = ()) -> list[str]:
    """Remove the entries of ``directory`` (not below it) that match ``patterns``, except the names in
    ``keep``: what killed writers left. Only for a directory no running process writes to; the names removed."""
    keep = set(keep)
    found = {p for pattern in patterns for p in Path(directory).glob(pattern) if p.name not in keep}
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return sorted(p.name for p in found)
