"""Output locations, checked before a stage computes anything."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tprl_ray.config import ConfigError


def check_writable(directory: str | Path) -> None:
    """Create ``directory`` if needed and write a scratch file there; a one-line ConfigError if either fails."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ConfigError(f"{directory}: output directory is not writable ({exc.strerror or exc})") from None
