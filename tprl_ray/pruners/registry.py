"""Pruners by the names used on the command line and in reports.

The table names each pruner's class by module, so that the names can be checked (and ``--help``
built) without importing torch; :func:`build_pruner` imports the class it needs.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from tprl_ray.config import EMBEDDED_LFD, known_name

PRUNERS = {
    "none": "base:NoPruning",
    "random": "random:RandomPruner",
    "vispruner": "vispruner:VisPruner",
    "divprune": "divprune:DivPrune",
    "tome": "tome:ToMe",
    "fastv": "fastv:FastV",
    "cdpruner": "cdpruner:CDPruner",
    "visionzip": "visionzip:VisionZip",
    "prumerge+": "prumerge:PruMergePlus",
    "sparsevlm": "sparsevlm:SparseVLM",
    "oracle": "oracle:Oracle",
    "lfd": "lfd:LearnedPruner",
    "tprl": "lfd:TprlPruner",
}
BASELINES = ("random", "vispruner", "divprune", "tome", "prumerge+", "visionzip", "cdpruner", "sparsevlm", "fastv")
LEARNED = ("lfd", "tprl")
REFERENCES = ("oracle",)  # not methods: the embedded benchmark's question-aware reference


def pruner_class(name: str) -> type:
    """The class of the pruner called ``name``."""
    module, cls = PRUNERS[known_name("pruner", name, PRUNERS)].split(":")
    return getattr(importlib.import_module(f"tprl_ray.pruners.{module}"), cls)


def build_pruner(name: str, seed: int = 0, policy: str | Path | None = None):
    """The pruner called ``name``; ``policy`` is the directory of a learned pruner (``lfd``, default:
    the policy shipped for the embedded model; ``tprl``, required: a ``tprl train ppo`` output)."""
    cls = pruner_class(name)
    if name == "random":
        return cls(seed)
    if name == "lfd":
        return cls(policy or EMBEDDED_LFD)
    if name == "tprl":
        if policy is None:
            raise ValueError("pruner 'tprl' needs the directory of a `tprl train ppo` output (--policies tprl=DIR)")
        return cls(policy)
    return cls()
