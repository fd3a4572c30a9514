"""Policy and value networks over the MDP state ``(Z_t, q)`` (docs/design.md §1.4), as plain torch modules.

Shared feature extractor: ``X = [Z_t ; W q]`` (the kept tokens' codes plus one projected query
token), one multi-head self-attention layer with a residual connection and LayerNorm, giving
``f_1..f_K`` and ``f_q``. Policy head per token: ``g = LN(f + W2 GELU(W1 f + b1) + b2)``,
``p = sigmoid(w . g + b)``. Value head: the mean of the token features through the same residual
MLP + LN, then a linear layer to a scalar. Padded tokens (``mask == False``) are ignored everywhere.
The MLP-only ablation replaces the attention by ``f_i = LN(z_i + W q)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ResidualMLP(nn.Module):
    """``LN(x + W2 GELU(W1 x + b1) + b2)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2, self.norm = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


class PolicyValueNet(nn.Module):
    """``forward(codes [B, K, d_l], query [B, d_q], mask [B, K])`` -> (keep logits ``[B, K]``, values
    ``[B]``); the keep probability is ``sigmoid(logit)`` (:meth:`keep_probabilities`)."""

    def __init__(self, d_latent: int, d_query: int, heads: int = 4, hidden: int = 256, attention: bool = True):
        super().__init__()
        self.dims = {"d_latent": d_latent, "d_query": d_query, "heads": heads, "hidden": hidden, "attention": attention}
        self.query_proj = nn.Linear(d_query, d_latent)
        self.attention = nn.MultiheadAttention(d_latent, heads, batch_first=True) if attention else None
        self.norm = nn.LayerNorm(d_latent)
        self.policy_mlp, self.policy_out = ResidualMLP(d_latent, hidden), nn.Linear(d_latent, 1)
        self.value_mlp, self.value_out = ResidualMLP(d_latent, hidden), nn.Linear(d_latent, 1)

    def features(self, codes: torch.Tensor, query: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token features ``f_1..f_K`` (``[B, K, d_l]``)."""
        q = self.query_proj(query)[:, None]
        if self.attention is None:
            return self.norm(codes + q)
        x = torch.cat([codes, q], dim=1)
        keep = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        attended, _ = self.attention(x, x, x, key_padding_mask=~keep, need_weights=False)
        return self.norm(x + attended)[:, :-1]

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return self.policy_out(self.policy_mlp(f))[..., 0]

    @staticmethod
    def pool(f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean of the kept tokens' features, ``[B, d_l]`` (the value head's input)."""
        weights = mask.float()[..., None]
        return (f * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def value(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.value_out(self.value_mlp(pooled))[..., 0]

    def forward(
        self, codes: torch.Tensor, query: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(codes, query, mask)
        return self.logits(f), self.value(self.pool(f, mask))

    def keep_probabilities(self, codes: torch.Tensor, query: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(self.features(codes, query, mask)))
