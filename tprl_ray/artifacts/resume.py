"""The resume-identity check: a stage continues an earlier run only if it was made with the same settings."""

from __future__ import annotations

from pathlib import Path


def refuse_other_settings(before: dict, now: dict, where: Path, what: str) -> None:
    """Raise ValueError naming every setting that differs between the stored run and this one."""
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        raise ValueError(f"{where} holds a {what} with other {', '.join(changed)}; use another --out to start afresh")
