"""Random pruning: a uniform keep-set of the budget size, seeded per question."""

from __future__ import annotations

import hashlib

import torch

from tprl_ray.pruners.base import PruneBatch, Pruner, budget_tokens


class RandomPruner(Pruner):
    """Uniformly random keep-set; a question's keep-set depends only on (seed, question id)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def select(self, batch: PruneBatch, budget: float | int) -> list[torch.Tensor]:
        out = []
        for tokens, qid in zip(batch.tokens, batch.question_ids):
            n = tokens.shape[0]
            digest = hashlib.sha256(f"{self.seed}:{qid}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            out.append(torch.randperm(n, generator=gen)[: budget_tokens(budget, n)].to(tokens.device))
        return out


def random_keep(tokens, budget: float | int, seed: int = 0) -> list[torch.Tensor]:
    """Random keep-sets for the samples of ``tokens`` (question ids are their positions), for benchmarks."""
    batch = PruneBatch(
        list(tokens),
        list(tokens),
        None,
        [(0, 0)] * len(tokens),
        [str(i) for i in range(len(tokens))],
        [""] * len(tokens),
    )
    return RandomPruner(seed).prune(batch, budget).keep
