"""PruMerge+ ("LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models", Shang
et al., ICCV 2025): attention outliers, spatially uniform extra tokens, and a merge of the rest.

Outliers: the vision encoder's [CLS] attention ``a`` over the patches, above ``Q3 + 1.5 IQR`` (the
interquartile-range rule; quartiles interpolated linearly). PruMerge keeps only those; PruMerge+
adds about three spatially uniform tokens per outlier. For a fixed budget ``T``: up to
``ceil(T / 4)`` outliers, highest attention first, then tokens evenly spaced in raster order over the
positions not yet taken until ``T`` are kept. Merge: each kept token absorbs its ``k`` most similar
pruned tokens (cosine of the vision features), weighted by their [CLS] attention:
``v_i + sum_j a_j v_j`` (``k = 32`` for 576 tokens, scaled with the token count).

Adaptations to this project: similarity uses the feature-layer states rather than the last layer's
keys, merging acts on the LLM-ready tokens (as for ToMe), and the paper's extra summary token of
everything pruned is left out (every kept token here is an original position).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tprl_ray.pruners.base import PruneBatch, Pruner, Pruning, budget_tokens

NEIGHBOURS_PER_576 = 32


def iqr_outliers(attention: torch.Tensor) -> torch.Tensor:
    """Indices of the tokens whose attention is above ``Q3 + 1.5 IQR``, highest attention first."""
    q1, q3 = torch.quantile(attention.float(), torch.tensor([0.25, 0.75], device=attention.device))
    order = torch.argsort(attention, descending=True, stable=True)
    return order[attention[order] > q3 + 1.5 * (q3 - q1)]


def uniform_fill(n: int, taken: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` positions evenly spaced in raster order over the ``n`` positions not in ``taken``."""
    free = torch.ones(n, dtype=torch.bool, device=taken.device)
    free[taken] = False
    candidates = free.nonzero()[:, 0]
    if count <= 0:
        return candidates[:0]
    return candidates[torch.linspace(0, candidates.numel() - 1, count, device=taken.device).round().long()]


class PruMergePlus(Pruner):
    name = "prumerge+"
    needs_attention = True

    def flops(self, n: int, kept: int, d_llm: int, d_v: int, text_tokens: int = 0) -> float:
        """The kept tokens' similarities to the pruned ones."""
        return 2.0 * kept * (n - kept) * d_v

    def prune(self, batch: PruneBatch, budget: float | int) -> Pruning:
        if batch.attention is None:
            raise ValueError("prumerge+ needs the vision encoder's attention (encode with_attention=True)")
        keep, values = [], []
        for features, tokens, attention in zip(batch.features, batch.tokens, batch.attention):
            n = tokens.shape[0]
            total = budget_tokens(budget, n)
            outliers = iqr_outliers(attention)[: math.ceil(total / 4)]
            kept = torch.cat([outliers, uniform_fill(n, outliers, total - outliers.numel())])
            keep.append(torch.sort(kept).values)
            values.append(merge_pruned(features, tokens, attention, kept, max(1, round(NEIGHBOURS_PER_576 * n / 576))))
        return Pruning(keep, values)


def merge_pruned(
    features: torch.Tensor, tokens: torch.Tensor, attention: torch.Tensor, kept: torch.Tensor, k: int
) -> torch.Tensor:
    """Tokens with each kept value ``v_i`` replaced by ``v_i + sum_j a_j v_j`` over its ``k`` most similar
    pruned tokens ``j``."""
    pruned = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    pruned[kept] = False
    others = pruned.nonzero()[:, 0]
    values = tokens.clone()
    if not others.numel():
        return values
    normed = F.normalize(features.float(), dim=-1)
    nearest = (normed[kept] @ normed[others].T).topk(min(k, others.numel()), dim=1).indices
    weights = attention[others][nearest].to(tokens.dtype)  # [kept, k]
    values[kept] = tokens[kept] + (weights[..., None] * tokens[others][nearest]).sum(dim=1)
    return values
