"""SparseVLM ("SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", Zhang et al., ICML 2025) as a pruner: text raters thin the visual tokens in the LLM.

Raters: of the text tokens after the image, those whose relevance to the visual tokens at the LLM
input (a softmax over the text tokens of each visual token's dot products, averaged over the visual
tokens) is above the mean. Stages: after decoder layers 2, 6 and 15 of a 32-layer LLM, scaled to the
model's depth (``round(l * L / 32)``; layers 0, 1, 2 of the tiny model's 4), the visual tokens with
the highest mean rater attention (head-averaged) are kept. Schedule: the budget ``T`` is the count
the last stage keeps, with geometric steps before it, ``N (T / N)^(s / S)`` after stage ``s`` of
``S``; 64 of 576 gives 277, 133, 64.

Adaptations to this project: the authors define the budget as the layer-averaged count (192: 300,
200, 110 after layers 2, 6, 15 of 32), which a 4-layer model cannot reach at small budgets, so ``T``
is the final count here and the report shows the layer average; the pruned tokens are dropped, not
recycled into merged tokens (as in the authors' v2), and kept tokens keep their positions.
"""

from __future__ import annotations

from tprl_ray.backbones.inllm import Stage, rater_ranking
from tprl_ray.pruners.inllm import InLlmPruner

REFERENCE_LAYERS = (2, 6, 15)  # of a 32-layer LLM
REFERENCE_DEPTH = 32


def stage_layers(layers: int) -> list[int]:
    """The layers after which SparseVLM prunes, scaled from the 32-layer reference."""
    return sorted({min(layers - 2, round(layer * layers / REFERENCE_DEPTH)) for layer in REFERENCE_LAYERS})


def schedule(n: int, kept: int, layers: int) -> list[Stage]:
    """Geometric steps from ``n`` visual tokens down to ``kept`` after the last stage."""
    after = stage_layers(layers)
    counts = [round(n * (kept / n) ** ((s + 1) / len(after))) for s in range(len(after))]
    return [Stage(layer, count) for layer, count in zip(after, [*counts[:-1], kept])]


class SparseVLM(InLlmPruner):
    name = "sparsevlm"
    ranking = rater_ranking

    def stages(self, n: int, kept: int, layers: int) -> list[Stage]:
        return schedule(n, kept, layers)

    def flops(self, n: int, kept: int, d_llm: int, d_v: int, text_tokens: int = 0) -> float:
        """Rater selection (visual x text dot products) and, at each stage, every text token's query
        against the visual keys (an upper bound: every text token a rater). Stage counts need the
        depth, so the stages are bounded by ``n`` visual tokens each."""
        return 2.0 * n * text_tokens * d_llm + len(REFERENCE_LAYERS) * 2.0 * text_tokens * n * d_llm
