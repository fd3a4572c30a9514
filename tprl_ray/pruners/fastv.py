"""FastV ("An Image is Worth 1/2 Tokens After Layer 2", Chen et al., ECCV 2024) as a pruner.

It prunes inside the LLM: layers ``< K`` see all ``N`` visual tokens; after layer ``K-1`` the last
prompt token's attention ranks them and layers ``>= K`` keep the top ``T`` (the budget). Its average
visual tokens per layer, as the pruning papers report it, is ``(K * N + (L - K) * T) / L``.
"""

from __future__ import annotations

from collections import defaultdict

from tprl_ray.backbones.base import Backbone
from tprl_ray.backbones.fastv import fastv_generate
from tprl_ray.pruners.base import PruneBatch, Pruner, budget_tokens


class FastV(Pruner):
    name = "fastv"

    def __init__(self, k: int = 2):
        self.k = k

    def layer_tokens(self, n: int, kept: int, layers: int) -> list[int]:
        return [n] * self.k + [kept] * (layers - self.k)

    def flops(self, n: int, kept: int, d_llm: int, d_v: int) -> float:
        return 2.0 * n * d_llm  # the last prompt token's query against the visual keys at layer K-1

    def generate(
        self, backbone: Backbone, batch: PruneBatch, budget: float | int, max_new_tokens: int = 8
    ) -> tuple[list[str], list[float]]:
        """FastV decoding; samples are grouped by visual token count (dynamic-resolution models)."""
        layers = backbone.language_model.config.num_hidden_layers
        groups = defaultdict(list)
        for i, tokens in enumerate(batch.tokens):
            groups[tokens.shape[0]].append(i)
        texts, seen = [""] * len(batch.tokens), [0.0] * len(batch.tokens)
        for n, index in groups.items():
            kept = budget_tokens(budget, n)
            out, _ = fastv_generate(
                backbone,
                [batch.questions[i] for i in index],
                [batch.tokens[i] for i in index],
                self.k,
                kept,
                [batch.grids[i] for i in index],
                max_new_tokens,
            )
            for i, text in zip(index, out):
                texts[i], seen[i] = text, sum(self.layer_tokens(n, kept, layers)) / layers
        return texts, seen
