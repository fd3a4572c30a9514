"""DivPrune ("DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
Alvar et al., CVPR 2025): a max-min diverse subset of the LLM-ready visual tokens.

Distance is ``1 - cosine similarity``. The first token is the one whose nearest neighbour is
farthest; each next token is the candidate whose distance to the selected set (its minimum
distance to any selected token) is largest. No attention, no text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tprl_ray.pruners.base import PruneBatch, Pruner, budget_tokens


def max_min_diverse(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` tokens chosen greedily by the max-min rule, in selection order."""
    normed = F.normalize(tokens.float(), dim=-1)
    distance = 1.0 - normed @ normed.T
    n = tokens.shape[0]
    nearest = distance.masked_fill(torch.eye(n, dtype=torch.bool, device=tokens.device), float("inf")).min(dim=1).values
    chosen = [int(nearest.argmax())] if n > 1 else [0]
    to_set = distance[chosen[0]].clone()
    to_set[chosen[0]] = -float("inf")
    for _ in range(k - 1):
        nxt = int(to_set.argmax())
        chosen.append(nxt)
        to_set = torch.minimum(to_set, distance[nxt])
        to_set[chosen] = -float("inf")
    return torch.tensor(chosen, device=tokens.device)


class DivPrune(Pruner):
    name = "divprune"

    def flops(self, n: int, kept: int, d_llm: int, d_v: int, text_tokens: int = 0) -> float:
        return 2.0 * n * n * d_llm  # the pairwise cosine similarities

    def select(self, batch: PruneBatch, budget: float | int) -> list[torch.Tensor]:
        return [max_min_diverse(t, budget_tokens(budget, t.shape[0])) for t in batch.tokens]
