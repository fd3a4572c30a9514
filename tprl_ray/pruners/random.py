"""Random pruning: a uniform keep-set of the budget size, seeded per question."""

from __future__ import annotations

import hashlib

import torch

from tprl_ray.pruners.base import budget_tokens


class RandomPruner:
    """Uniformly random keep-set; a question's keep-set depends only on (seed, question id)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def keep(self, features, question_ids: list[str], questions: list[str],
             budget: float | int) -> list[torch.Tensor]:
        out = []
        for tokens, qid in zip(features, question_ids):
            n = tokens.shape[0]
            k = budget_tokens(budget, n)
            digest = hashlib.sha256(f"{self.seed}:{qid}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            out.append(torch.sort(torch.randperm(n, generator=gen)[:k]).values)
        return out
