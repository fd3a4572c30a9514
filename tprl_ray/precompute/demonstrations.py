"""Demonstration trajectories for LfD: nested keep-masks over a pruning schedule.

A schedule lists the fraction of the *original* ``N`` tokens pruned after each step, e.g.
``[0.0, 0.25, 0.5]``: step 0 keeps everything, step 1 keeps ``round(0.75 N)``, step 2 ``round(0.5 N)``.
Step ``t`` runs the demonstrator on the tokens step ``t-1`` kept (their tokens, features, attention
and the question's query only), so each step's kept set is a subset of the previous one: the
sequential decisions the policy imitates. Demonstrators: VisPruner (the paper's, question-blind)
and CDPruner (question-aware: relevance to the instruction times diversity).
"""

from __future__ import annotations

import torch

from tprl_ray.pruners.base import PruneBatch, Pruner
from tprl_ray.pruners.cdpruner import CDPruner
from tprl_ray.pruners.vispruner import VisPruner

DEMONSTRATORS: dict[str, type[Pruner]] = {"vispruner": VisPruner, "cdpruner": CDPruner}


def demonstration_masks(
    demonstrator: Pruner,
    tokens: torch.Tensor,
    features: torch.Tensor,
    attention: torch.Tensor,
    query: torch.Tensor,
    schedule: list[float],
) -> torch.Tensor:
    """``[len(schedule), N]`` 0/1 masks over original token indices, nested step by step."""
    n = features.shape[0]
    keep, masks = torch.arange(n, device=features.device), []
    for pruned in schedule:
        target = max(1, round(n * (1.0 - pruned)))
        if target < keep.numel():
            sub = PruneBatch(
                [tokens[keep]], [features[keep]], [attention[keep]], [(1, keep.numel())], [""], [""], [query]
            )
            keep = keep[demonstrator.prune(sub, target).keep[0]]
        mask = torch.zeros(n, dtype=torch.uint8, device=features.device)
        mask[keep] = 1
        masks.append(mask)
    return torch.stack(masks)
