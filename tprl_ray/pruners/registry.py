"""Pruners by the names used on the command line and in reports."""

from __future__ import annotations

from pathlib import Path

import torch

from tprl_ray.config import known_name
from tprl_ray.pruners.base import PruneBatch, Pruner
from tprl_ray.pruners.divprune import DivPrune
from tprl_ray.pruners.fastv import FastV
from tprl_ray.pruners.lfd import LearnedPruner, TprlPruner
from tprl_ray.pruners.random import RandomPruner
from tprl_ray.pruners.tome import ToMe
from tprl_ray.pruners.vispruner import VisPruner


class NoPruning(Pruner):
    """The unpruned model: every visual token is kept."""

    name = "none"

    def select(self, batch: PruneBatch, budget: float | int) -> list[torch.Tensor]:
        return [torch.arange(t.shape[0], device=t.device) for t in batch.tokens]


PRUNERS = {cls.name: cls for cls in (NoPruning, RandomPruner, VisPruner, DivPrune, ToMe, FastV, LearnedPruner,
                                      TprlPruner)}
BASELINES = ("random", "vispruner", "divprune", "tome", "fastv")
EMBEDDED_LFD = Path(__file__).resolve().parent.parent / "assets" / "tiny-llava-digits-lfd"


def build_pruner(name: str, seed: int = 0, policy: str | Path | None = None) -> Pruner:
    """The pruner called ``name``; ``policy`` is the directory of a learned pruner (``lfd``, default:
    the policy shipped for the embedded model; ``tprl``, required: a ``tprl train ppo`` output)."""
    known_name("pruner", name, PRUNERS)
    if name == "random":
        return RandomPruner(seed)
    if name == "lfd":
        return LearnedPruner(policy or EMBEDDED_LFD)
    if name == "tprl":
        if policy is None:
            raise ValueError("pruner 'tprl' needs the directory of a `tprl train ppo` output (--policy)")
        return TprlPruner(policy)
    return PRUNERS[name]()
