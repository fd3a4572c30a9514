"""The exported-module format: ``NAME.safetensors`` (the weights) beside ``NAME.json`` (a card whose
``dims`` are the module's constructor arguments, plus what the stage adds). The autoencoder, the LfD
policy and the PPO policy are exported this way; a pruner directory holds a policy and a copy of its
autoencoder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tprl_ray.artifacts.atomic import atomic_write_bytes


def export(module, state: dict, out: Path, name: str, card: dict) -> None:
    """Load ``state`` into ``module`` and write ``name.safetensors`` and ``name.json`` atomically."""
    from safetensors.torch import save

    module.load_state_dict(state)
    atomic_write_bytes(out / f"{name}.safetensors", save({k: v.contiguous() for k, v in module.state_dict().items()}))
    atomic_write_bytes(out / f"{name}.json", json.dumps({"dims": module.dims, **card}, indent=2).encode())


def load_exported(cls, directory: Path, name: str):
    """A module saved by :func:`export`, in eval mode, and its card."""
    from safetensors.torch import load_file

    card_path = Path(directory) / f"{name}.json"
    if not card_path.is_file():
        raise FileNotFoundError(f"{directory}: no {name}.json (train it first)")
    card = json.loads(card_path.read_text())
    module = cls(**card["dims"])
    module.load_state_dict(load_file(str(Path(directory) / f"{name}.safetensors")))
    return module.eval(), card


def copy_export(source: Path, out: Path, name: str) -> None:
    """Copy the export ``name`` from ``source`` into ``out`` (nothing to do when they are the same)."""
    out.mkdir(parents=True, exist_ok=True)
    for file in (f"{name}.safetensors", f"{name}.json"):
        if (source / file).resolve() != (out / file).resolve():
            shutil.copyfile(source / file, out / file)
