"""CDPruner ("Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs", Zhang et al., NeurIPS 2025): the instruction-conditioned determinantal point process.

Each visual token gets a relevance to the instruction, ``r_i`` = cosine of the token with the
instruction embedding, min-max normalised over the image's tokens. With ``S`` the cosine
similarity of the LLM-ready tokens, the conditional kernel is ``L = diag(r) S diag(r)``: a subset's
``det(L_Y)`` grows with both its members' relevance and their mutual diversity. The kept set is the
greedy MAP of that DPP (the fast incremental Cholesky form of Chen et al., NeurIPS 2018), ``T``
steps, ties to the lowest index; kept tokens go to the LLM in raster order.

Instruction embedding: the paper's LLaVA code encodes the question with CLIP's text tower against
the CLIP-projected patches. Our backbones have no separate text tower (the embedded tiny LLaVA,
Qwen2.5-VL), so both sides live in the LLM's input-embedding space: the instruction is the mean LLM
input embedding of the question's own tokens (the MDP's query vector, ``PruneBatch.queries``) and
the visual tokens are the post-projector ones, with the relevance's sign positive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tprl_ray.pruners.base import PruneBatch, Pruner, budget_tokens

EPS = 1e-6


def conditional_kernel(tokens: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``L = diag(r) S diag(r)``: ``S`` the tokens' cosine similarities, ``r`` their min-max normalised
    cosine with ``query``."""
    normed = F.normalize(tokens.float(), dim=-1)
    relevance = normed @ F.normalize(query.float(), dim=-1)
    relevance = (relevance - relevance.min() + EPS) / (relevance.max() - relevance.min() + EPS)
    return relevance[:, None] * (normed @ normed.T) * relevance[None, :]


def greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` items chosen greedily to maximise ``det(kernel[Y, Y])``, in selection order.

    ``gains[j]`` is the squared norm of item ``j``'s kernel vector orthogonal to the chosen ones: each
    step takes the largest, then updates every gain with the new Cholesky row ``e``."""
    n = kernel.shape[0]
    gains = kernel.diagonal().clone()
    rows = torch.zeros(k, n, dtype=kernel.dtype, device=kernel.device)
    chosen = []
    for i in range(k):
        j = int(gains.argmax())
        chosen.append(j)
        e = (kernel[j] - rows[:i, j] @ rows[:i]) / gains[j].clamp_min(EPS).sqrt()
        rows[i] = e
        gains = gains - e * e
        gains[chosen] = -torch.inf
    return torch.tensor(chosen, device=kernel.device)


class CDPruner(Pruner):
    name = "cdpruner"
    needs_query = True

    def flops(self, n: int, kept: int, d_llm: int, d_v: int, text_tokens: int = 0) -> float:
        """The similarity matrix, the relevance, and ``kept`` Cholesky-row updates of ``n`` entries."""
        return 2.0 * n * n * d_llm + 2.0 * n * d_llm + sum(2.0 * i * n for i in range(kept))

    def select(self, batch: PruneBatch, budget: float | int) -> list[torch.Tensor]:
        if batch.queries is None:
            raise ValueError("cdpruner needs the instruction's query embedding (PruneBatch.queries)")
        return [
            greedy_map(conditional_kernel(tokens, query.to(tokens.device)), budget_tokens(budget, tokens.shape[0]))
            for tokens, query in zip(batch.tokens, batch.queries)
        ]
