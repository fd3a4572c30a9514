"""FastV ("An Image is Worth 1/2 Tokens After Layer 2", Chen et al., ECCV 2024) as a pruner.

It prunes inside the LLM: layers ``< K`` see all ``N`` visual tokens; after layer ``K-1`` the last
prompt token's attention ranks them and layers ``>= K`` keep the top ``T`` (the budget). Its average
visual tokens per layer, as the pruning papers report it, is ``(K * N + (L - K) * T) / L``.
"""

from __future__ import annotations

from tprl_ray.backbones.inllm import Stage, fastv_stages, last_token_ranking
from tprl_ray.pruners.inllm import InLlmPruner


class FastV(InLlmPruner):
    name = "fastv"
    ranking = last_token_ranking

    def __init__(self, k: int = 2):
        self.k = k

    def stages(self, n: int, kept: int, layers: int) -> list[Stage]:
        return fastv_stages(layers, self.k, kept)

    def flops(self, n: int, kept: int, d_llm: int, d_v: int, text_tokens: int = 0) -> float:
        return 2.0 * n * d_llm  # the last prompt token's query against the visual keys at layer K-1
