"""The pruner interface: which visual tokens of each sample reach the LLM."""

from __future__ import annotations

from typing import Protocol

import torch


def budget_tokens(budget: float | int, n_tokens: int) -> int:
    """Kept-token count for a budget given as a kept fraction (float in (0, 1]) or a count (int)."""
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget fraction {budget} must be in (0, 1]")
        return max(1, min(n_tokens, round(budget * n_tokens)))
    if budget < 1:
        raise ValueError(f"budget {budget} must keep at least one token")
    return min(n_tokens, budget)


class Pruner(Protocol):
    """Given each sample's visual tokens (``features[i]``: ``[N_i, d]``) and question, the sorted
    original indices to keep per sample."""

    name: str

    def keep(self, features, question_ids: list[str], questions: list[str],
             budget: float | int) -> list[torch.Tensor]: ...
