"""VisPruner ("Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs", Zhang et al., ICCV 2025): half the budget to the most-attended tokens, half to diverse ones.

Important tokens: the top ``int(T / 2)`` by the vision encoder's attention signal ([CLS] attention at
the feature layer for CLIP; attention received in the last block for Qwen2.5-VL). Diverse tokens:
the rest, in descending attention order, are thinned in rounds until ``T - int(T / 2)`` remain.
Each round removes ``r = min(8, remaining - target)`` tokens: split the remainder into even
positions A and odd positions B, score each A token by its largest cosine similarity to any B token
(L2-normalised features), sort A by that score (descending), drop its first ``r`` tokens, and
continue with the surviving A tokens *in that descending-similarity order* followed by all of B in
their previous order. The order matters: the next round splits the remainder by position again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tprl_ray.pruners.base import PruneBatch, Pruner, budget_tokens

ROUND_SIZE = 8


def remove_duplicates(features: torch.Tensor, order: torch.Tensor, target: int) -> torch.Tensor:
    """Thin ``order`` (indices into ``features``) to ``target`` tokens by VisPruner's rounds."""
    normed = F.normalize(features.float(), dim=-1)
    remaining = order
    while remaining.numel() > target:
        a, b = remaining[0::2], remaining[1::2]
        r = min(ROUND_SIZE, remaining.numel() - target, a.numel())
        similarity = (normed[a] @ normed[b].T).max(dim=1).values
        by_similarity = torch.argsort(similarity, descending=True, stable=True)
        remaining = torch.cat([a[by_similarity[r:]], b])  # survivors stay in descending-similarity order
    return remaining


class VisPruner(Pruner):
    name = "vispruner"
    needs_attention = True

    def flops(self, n: int, kept: int, d_llm: int, d_v: int, text_tokens: int = 0) -> float:
        """The A x B similarities of every duplicate-removal round."""
        remaining, target, total = n - int(kept * 0.5), kept - int(kept * 0.5), 0.0
        while remaining > target:
            a = (remaining + 1) // 2
            total += 2.0 * a * (remaining - a) * d_v
            remaining -= min(ROUND_SIZE, remaining - target, a)
        return total

    def select(self, batch: PruneBatch, budget: float | int) -> list[torch.Tensor]:
        if batch.attention is None:
            raise ValueError("vispruner needs the vision encoder's attention (encode with_attention=True)")
        out = []
        for features, attention in zip(batch.features, batch.attention):
            total = budget_tokens(budget, features.shape[0])
            n_important = int(total * 0.5)
            order = torch.argsort(attention, descending=True, stable=True)
            diverse = remove_duplicates(features, order[n_important:], total - n_important)
            out.append(torch.cat([order[:n_important], diverse]))
        return out
