"""Figures: matplotlib without a display, and PNGs written atomically."""

from __future__ import annotations

import io
from pathlib import Path

from tprl_ray.artifacts.atomic import atomic_write_bytes


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, **savefig) -> None:
    """``fig`` as a PNG at ``path`` (atomically; ``savefig`` options such as ``dpi``), then closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig)
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
