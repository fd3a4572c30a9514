"""The pruner interface: which visual tokens of each sample reach the LLM, and with what values.

A pruner sees a :class:`PruneBatch` (each sample's LLM-ready tokens, pre-projector features,
attention signal, grid and question) and a budget, as a kept fraction (float in (0, 1]) or a token
count (int). Input pruners return sorted kept indices (and, if they merge, new values for the kept
tokens); in-LLM pruners (FastV) override :meth:`Pruner.generate` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tprl_ray.backbones.base import Backbone, Grid


def budget_tokens(budget: float | int, n_tokens: int) -> int:
    """Kept-token count for a budget given as a kept fraction (float in (0, 1]) or a count (int)."""
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget fraction {budget} must be in (0, 1]")
        return max(1, min(n_tokens, round(budget * n_tokens)))
    if budget < 1:
        raise ValueError(f"budget {budget} must keep at least one token")
    return min(n_tokens, budget)


@dataclass
class PruneBatch:
    """Per sample ``i``: ``tokens[i]`` ``[N_i, d_llm]``, ``features[i]`` ``[N_i, d_v]``, ``attention[i]``
    ``[N_i]`` (when the pruner asked for it), the token grid, the question, (when the pruner asked
    for it) the question's query embedding ``[d_llm]`` and the question's benchmark fields."""

    tokens: list[torch.Tensor]
    features: list[torch.Tensor]
    attention: list[torch.Tensor] | None
    grids: list[Grid]
    question_ids: list[str]
    questions: list[str]
    queries: list[torch.Tensor] | None = None
    extra: list[dict] | None = None

    def take(self, index: list[int]) -> PruneBatch:
        """The samples at ``index``, in that order."""
        pick = lambda values: None if values is None else [values[i] for i in index]
        return PruneBatch(
            pick(self.tokens),
            pick(self.features),
            pick(self.attention),
            pick(self.grids),
            pick(self.question_ids),
            pick(self.questions),
            pick(self.queries),
            pick(self.extra),
        )

    @classmethod
    def encode(
        cls,
        backbone: Backbone,
        images: list,
        image_of: list[int],
        questions: list[str],
        question_ids: list[str],
        with_attention: bool,
        with_query: bool,
        extra: list[dict] | None = None,
    ) -> PruneBatch:
        """One vision pass over ``images``; question ``i`` is about ``images[image_of[i]]``."""
        visual = backbone.encode(images, with_attention=with_attention)
        return cls(
            [visual.llm_tokens[j] for j in image_of],
            [visual.features[j] for j in image_of],
            None if visual.attention is None else [visual.attention[j] for j in image_of],
            [visual.grids[j] for j in image_of],
            question_ids,
            questions,
            [backbone.query_embedding(q) for q in questions] if with_query else None,
            extra,
        )


@dataclass
class Pruning:
    """Sorted kept indices per sample, and the LLM tokens to use (``[N_i, d_llm]``; a merging pruner
    writes the merged values at the kept indices)."""

    keep: list[torch.Tensor]
    tokens: list[torch.Tensor]


class Pruner:
    """Base of every pruner: ``name`` as used on the command line and in reports; subclasses
    implement :meth:`select` (and set ``needs_attention`` if they read ``PruneBatch.attention``)."""

    name: str
    needs_attention = False
    needs_query = False

    def select(self, batch: PruneBatch, budget: float | int) -> list[torch.Tensor]:
        raise NotImplementedError

    def flops(self, n: int, kept: int, d_llm: int, d_v: int, text_tokens: int = 0) -> float:
        """The pruner's own FLOPs for one image of ``n`` tokens and a prompt of ``text_tokens`` (matrix
        products, 2 per multiply-add)."""
        return 0.0

    def layer_tokens(self, n: int, kept: int, layers: int) -> list[int]:
        """Visual tokens each decoder layer sees."""
        return [kept] * layers

    def prune(self, batch: PruneBatch, budget: float | int) -> Pruning:
        return Pruning([torch.sort(k).values for k in self.select(batch, budget)], batch.tokens)

    def generate(
        self, backbone: Backbone, batch: PruneBatch, budget: float | int, max_new_tokens: int = 8
    ) -> tuple[list[str], list[float]]:
        """Greedy answers with the pruned input, and the visual tokens each sample's LLM layers saw
        on average."""
        ids, seen = self.generate_ids(backbone, batch, budget, max_new_tokens)
        return backbone.decode(ids), seen

    def generate_ids(
        self, backbone: Backbone, batch: PruneBatch, budget: float | int, max_new_tokens: int = 8
    ) -> tuple[list[list[int]], list[float]]:
        """:meth:`generate` as token ids (each ending with the end of turn if the answer finished)."""
        pruning = self.prune(batch, budget)
        ids = backbone.generate_ids(batch.questions, pruning.tokens, pruning.keep, batch.grids, max_new_tokens)
        return ids, [float(len(k)) for k in pruning.keep]


class NoPruning(Pruner):
    """The unpruned model: every visual token is kept."""

    name = "none"

    def select(self, batch: PruneBatch, budget: float | int) -> list[torch.Tensor]:
        return [torch.arange(t.shape[0], device=t.device) for t in batch.tokens]
