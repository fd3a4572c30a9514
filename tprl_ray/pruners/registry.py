"""Pruners by the names used on the command line and in reports."""

from __future__ import annotations

import torch

from tprl_ray.pruners.base import PruneBatch, Pruner
from tprl_ray.pruners.divprune import DivPrune
from tprl_ray.pruners.fastv import FastV
from tprl_ray.pruners.random import RandomPruner
from tprl_ray.pruners.tome import ToMe
from tprl_ray.pruners.vispruner import VisPruner


class NoPruning(Pruner):
    """The unpruned model: every visual token is kept."""

    name = "none"

    def select(self, batch: PruneBatch, budget: float | int) -> list[torch.Tensor]:
        return [torch.arange(t.shape[0], device=t.device) for t in batch.tokens]


PRUNERS = {cls.name: cls for cls in (NoPruning, RandomPruner, VisPruner, DivPrune, ToMe, FastV)}
BASELINES = ("random", "vispruner", "divprune", "tome", "fastv")


def build_pruner(name: str, seed: int = 0) -> Pruner:
    if name not in PRUNERS:
        raise ValueError(f"unknown pruner {name!r} (available: {', '.join(PRUNERS)})")
    return PRUNERS[name](seed) if name == "random" else PRUNERS[name]()
