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


def check_export(directory: Path, name: str) -> None:
    """A one-line FileNotFoundError unless ``directory`` holds both files of the export ``name``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: {name} directory not found")
    missing = [f for f in (f"{name}.json", f"{name}.safetensors") if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{directory}: no {' or '.join(missing)} (not a complete {name} export; train it first)"
        )


def load_exported(cls, directory: Path, name: str):
    """A module saved by :func:`export`, in eval mode, and its card; a one-line FileNotFoundError or
    ValueError naming the directory when the export is missing, incomplete or not ``cls``'s."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    check_export(directory, name)
    try:
        card = json.loads((directory / f"{name}.json").read_text())
        module = cls(**card["dims"])
        module.load_state_dict(load_file(str(directory / f"{name}.safetensors")))
    except (json.JSONDecodeError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise ValueError(f"{directory}: {name} export does not load ({str(exc).splitlines()[0]})") from None
    return module.eval(), card


def copy_export(source: Path, out: Path, name: str) -> None:
    """Copy the export ``name`` from ``source`` into ``out`` (nothing to do when they are the same)."""
    out.mkdir(parents=True, exist_ok=True)
    for file in (f"{name}.safetensors", f"{name}.json"):
        if (source / file).resolve() != (out / file).resolve():
            shutil.copyfile(source / file, out / file)
