"""One-shot ToMe ("Token Merging: Your ViT But Faster", Bolya et al., ICLR 2023) on the encoder output.

Bipartite soft matching, repeated until the budget is met: the current tokens (in raster order)
alternate into sets A and B; every A token finds its most cosine-similar B token (on the vision
features); the ``r = min(excess, |A|)`` best-matched A tokens merge into their B partners. A merge
is the size-weighted average, of the features (for later rounds) and of the LLM-ready tokens (what
the LLM receives); the merged token keeps its B token's index, hence its position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tprl_ray.pruners.base import PruneBatch, Pruner, Pruning, budget_tokens


def bipartite_merge(features: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge down to ``k`` tokens; returns the kept indices (sorted) and the tokens with merged values."""
    feats, values = features.float().clone(), tokens.clone()
    sizes = torch.ones(features.shape[0], device=features.device)
    current = torch.arange(features.shape[0], device=features.device)
    while current.numel() > k:
        a, b = current[0::2], current[1::2]
        r = min(current.numel() - k, a.numel())
        score, partner = (F.normalize(feats[a], dim=-1) @ F.normalize(feats[b], dim=-1).T).max(dim=1)
        merged = score.topk(r).indices
        src, dst = a[merged], b[partner[merged]]
        new_sizes = sizes.clone().index_add_(0, dst, sizes[src])
        for store in (feats, values):  # size-weighted sums into the B tokens, then the new averages
            weight = sizes[:, None].to(store.dtype)
            summed = (store * weight).index_add_(0, dst, store[src] * weight[src])
            store[dst] = summed[dst] / new_sizes[dst, None].to(store.dtype)
        sizes = new_sizes
        survivors = torch.ones(a.numel(), dtype=torch.bool, device=a.device)
        survivors[merged] = False
        current = torch.sort(torch.cat([a[survivors], b])).values
    return current, values


class ToMe(Pruner):
    name = "tome"

    def flops(self, n: int, kept: int, d_llm: int, d_v: int, text_tokens: int = 0) -> float:
        """The A x B similarities of every matching round (merging averages are not counted)."""
        total = 0.0
        while n > kept:
            a = (n + 1) // 2
            total += 2.0 * a * (n - a) * d_v
            n -= min(n - kept, a)
        return total

    def prune(self, batch: PruneBatch, budget: float | int) -> Pruning:
        merged = [
            bipartite_merge(features, tokens, budget_tokens(budget, tokens.shape[0]))
            for features, tokens in zip(batch.features, batch.tokens)
        ]
        return Pruning([keep for keep, _ in merged], [values for _, values in merged])
