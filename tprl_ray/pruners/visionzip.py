"""VisionZip ("VisionZip: Longer is Better but Not Necessary in Vision Language Models", Yang et al.,
CVPR 2025), the training-free variant: dominant tokens by attention plus merged contextual tokens.

Of a budget ``T``, ``C = round(T * 10 / 64)`` tokens are contextual (the authors' splits 54 + 10 of
64, 108 + 20 of 128, 162 + 30 of 192) and ``D = T - C`` dominant: the top ``D`` by the vision
encoder's [CLS] attention at the feature layer. The other tokens, in raster order, give the ``C``
contextual targets by a fixed stride (``step = max(1, R // C)`` over the ``R`` remaining, the first
``C`` of every ``step``-th); each remaining non-target token joins its most similar target (cosine of
the vision features), and a contextual token is its target plus the mean of the tokens it gathered.

Adaptations to this project: [CLS] never reaches the LLM here (LLaVA's "default" feature strategy),
so the dominant tokens are patches only; similarity uses the feature-layer states rather than that
layer's keys; merging acts on the LLM-ready tokens (after the projector), as for ToMe. A contextual
token keeps its target's index, hence its position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tprl_ray.pruners.base import PruneBatch, Pruner, Pruning, budget_tokens

CONTEXTUAL_SHARE = 10 / 64


def split_budget(total: int) -> tuple[int, int]:
    """(dominant, contextual) token counts of a budget; at least one dominant token."""
    contextual = min(total - 1, round(total * CONTEXTUAL_SHARE))
    return total - contextual, contextual


def contextual_tokens(
    features: torch.Tensor, tokens: torch.Tensor, rest: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` stride-chosen targets among ``rest`` (raster order) and the tokens with each
    target's value replaced by target + mean of the rest's tokens most similar to it."""
    step = max(1, rest.numel() // count)
    targets = rest[::step][:count]
    others = rest[~torch.isin(rest, targets)]
    values = tokens.clone()
    if others.numel():
        normed = F.normalize(features.float(), dim=-1)
        nearest = (normed[others] @ normed[targets].T).argmax(dim=1)
        for t, target in enumerate(targets.tolist()):
            members = others[nearest == t]
            if members.numel():
                values[target] = tokens[target] + tokens[members].mean(dim=0)
    return targets, values


class VisionZip(Pruner):
    name = "visionzip"
    needs_attention = True

    def flops(self, n: int, kept: int, d_llm: int, d_v: int, text_tokens: int = 0) -> float:
        """The similarities of the remaining tokens to the contextual targets."""
        dominant, contextual = split_budget(kept)
        return 2.0 * (n - dominant - contextual) * contextual * d_v

    def prune(self, batch: PruneBatch, budget: float | int) -> Pruning:
        if batch.attention is None:
            raise ValueError("visionzip needs the vision encoder's attention (encode with_attention=True)")
        keep, values = [], []
        for features, tokens, attention in zip(batch.features, batch.tokens, batch.attention):
            dominant_count, contextual_count = split_budget(budget_tokens(budget, tokens.shape[0]))
            order = torch.argsort(attention, descending=True, stable=True)
            dominant, rest = order[:dominant_count], torch.sort(order[dominant_count:]).values
            merged = tokens
            if contextual_count and rest.numel():
                targets, merged = contextual_tokens(features, tokens, rest, contextual_count)
                dominant = torch.cat([dominant, targets])
            keep.append(torch.sort(dominant).values)
            values.append(merged)
        return Pruning(keep, values)
