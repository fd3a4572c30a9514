"""Image decoding for the precompute pipeline's CPU tasks (light imports: numpy and PIL only)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


def ragged(arrays: list) -> np.ndarray:
    """A 1-D object array holding ``arrays`` as they are (shapes may differ)."""
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def decode_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each row's image file (``path``) as RGB pixels (``pixels``), or the reason it cannot be read (``error``)."""
    pixels, errors = [], []
    for name in batch["path"]:
        path = Path(str(name))
        try:
            with Image.open(io.BytesIO(path.read_bytes())) as img:
                pixels.append(np.asarray(img.convert("RGB")))
            errors.append("")
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            pixels.append(np.zeros((1, 1, 3), np.uint8))
            errors.append(f"{path}: cannot read image ({exc})")
    same = len({p.shape for p in pixels}) == 1
    return {**batch, "pixels": np.stack(pixels) if same else ragged(pixels), "error": np.array(errors, dtype=object)}


def decode_shard(shard: dict) -> dict:
    """A shard's images (``path``, one per question) as ``pixels``, with each unreadable one's reason in ``error``."""
    decoded = decode_images({"path": np.asarray(shard["path"])})
    return {**shard, "pixels": list(decoded["pixels"]), "error": list(decoded["error"])}
