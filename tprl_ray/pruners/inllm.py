"""Pruners inside the LLM: a schedule of stages and a ranking, run by :mod:`tprl_ray.backbones.inllm`.

Layers before a stage see every visual token, so the saving is partial; the report's tokens are the
visual tokens each decoder layer saw, averaged over the layers, as the pruning papers report them.
"""

from __future__ import annotations

from collections import defaultdict

from tprl_ray.backbones.base import Backbone
from tprl_ray.backbones.inllm import Stage, staged_generate
from tprl_ray.pruners.base import PruneBatch, Pruner, budget_tokens


class InLlmPruner(Pruner):
    """Subclasses give :meth:`stages` and ``ranking``."""

    ranking = None

    def stages(self, n: int, kept: int, layers: int) -> list[Stage]:
        raise NotImplementedError

    def layer_tokens(self, n: int, kept: int, layers: int) -> list[int]:
        after = {s.after_layer: s.keep for s in self.stages(n, kept, layers)}
        counts, current = [], n
        for i in range(layers):
            counts.append(current)
            current = min(current, after.get(i, current))
        return counts

    def generate_ids(
        self, backbone: Backbone, batch: PruneBatch, budget: float | int, max_new_tokens: int = 8
    ) -> tuple[list[list[int]], list[float]]:
        """Staged decoding; samples are grouped by visual token count (dynamic-resolution models)."""
        layers = backbone.language_model.config.num_hidden_layers
        groups = defaultdict(list)
        for i, tokens in enumerate(batch.tokens):
            groups[tokens.shape[0]].append(i)
        ids, seen = [[]] * len(batch.tokens), [0.0] * len(batch.tokens)
        for n, index in groups.items():
            kept = budget_tokens(budget, n)
            out, _ = staged_generate(
                backbone,
                [batch.questions[i] for i in index],
                [batch.tokens[i] for i in index],
                self.stages(n, kept, layers),
                type(self).ranking,
                [batch.grids[i] for i in index],
                max_new_tokens,
            )
            for i, sequence in zip(index, out):
                ids[i], seen[i] = sequence, sum(self.layer_tokens(n, kept, layers)) / layers
        return ids, seen
