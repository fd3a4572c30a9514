"""Policy and value networks over the MDP state ``(Z_t, q)`` (docs/design.md §1.4), as plain torch modules.

Shared feature extractor: ``X = [Z_t + P ; W q]`` (the kept tokens' codes, with ``positions=True``
plus a learned projection ``P`` of Fourier features of each token's place in its grid, and one
projected query token), one multi-head self-attention layer with a residual connection and LayerNorm, giving
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


POSITION_FREQUENCIES = 4


def position_features(grids: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, width, 4 * POSITION_FREQUENCIES]``: :func:`grid_features` of each sample's grid
    (``grids`` ``[B, 2]``), zeros after its ``rows * cols`` tokens."""
    out = torch.zeros(grids.shape[0], width, 4 * POSITION_FREQUENCIES, device=grids.device)
    for rows, cols in torch.unique(grids, dim=0).tolist():
        same = (grids == torch.tensor([rows, cols], device=grids.device)).all(dim=1)
        out[same, : rows * cols] = grid_features(rows, cols, device=grids.device)
    return out


def grid_features(rows: int, cols: int, device=None) -> torch.Tensor:
    """``[rows * cols, 4 * POSITION_FREQUENCIES]`` raster-order Fourier features of each cell's centre
    (row and column scaled to [0, 1]): ``sin`` and ``cos`` of ``pi * k * x`` for ``k = 1..F``."""
    r = (torch.arange(rows, device=device, dtype=torch.float32) + 0.5) / rows
    c = (torch.arange(cols, device=device, dtype=torch.float32) + 0.5) / cols
    r, c = torch.meshgrid(r, c, indexing="ij")
    k = torch.arange(1, POSITION_FREQUENCIES + 1, device=device, dtype=torch.float32) * torch.pi
    x = torch.stack([r.flatten(), c.flatten()], dim=-1)[..., None] * k  # [N, 2, F]
    return torch.cat([x.sin(), x.cos()], dim=-1).flatten(1)


class PolicyValueNet(nn.Module):
    """``forward(codes [B, K, d_l], query [B, d_q], mask [B, K])`` -> (keep logits ``[B, K]``, values
    ``[B]``); the keep probability is ``sigmoid(logit)`` (:meth:`keep_probabilities`). With
    ``positions``, every call also takes the token ``grid``: ``(rows, cols)`` for the whole batch, or
    one per sample (``[B, 2]``) when token counts differ (a sample's tokens come first, padding after)."""

    def __init__(
        self,
        d_latent: int,
        d_query: int,
        heads: int = 4,
        hidden: int = 256,
        attention: bool = True,
        positions: bool = False,
    ):
        super().__init__()
        self.dims = {
            "d_latent": d_latent,
            "d_query": d_query,
            "heads": heads,
            "hidden": hidden,
            "attention": attention,
            "positions": positions,
        }
        self.query_proj = nn.Linear(d_query, d_latent)
        self.position_proj = nn.Linear(4 * POSITION_FREQUENCIES, d_latent) if positions else None
        self.attention = nn.MultiheadAttention(d_latent, heads, batch_first=True) if attention else None
        self.norm = nn.LayerNorm(d_latent)
        self.policy_mlp, self.policy_out = ResidualMLP(d_latent, hidden), nn.Linear(d_latent, 1)
        self.value_mlp, self.value_out = ResidualMLP(d_latent, hidden), nn.Linear(d_latent, 1)

    def features(
        self,
        codes: torch.Tensor,
        query: torch.Tensor,
        mask: torch.Tensor,
        grid: tuple[int, int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token features ``f_1..f_K`` (``[B, K, d_l]``)."""
        if self.position_proj is not None:
            grids = None if grid is None else torch.as_tensor(grid, device=codes.device).long().reshape(-1, 2)
            one = isinstance(grid, tuple | list)  # one grid for the batch: it must cover every token
            if (
                grids is None
                or (grids.prod(dim=1) > codes.shape[1]).any()
                or (one and grid[0] * grid[1] != codes.shape[1])
            ):
                raise ValueError(
                    f"a positional policy needs the token grid of its {codes.shape[1]} tokens (got {grid})"
                )
            grids = grids.expand(codes.shape[0], 2)
            codes = codes + self.position_proj(position_features(grids, codes.shape[1]))
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
        self, codes: torch.Tensor, query: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(codes, query, mask, grid)
        return self.logits(f), self.value(self.pool(f, mask))

    def keep_logits(
        self, codes: torch.Tensor, query: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        return self.logits(self.features(codes, query, mask, grid))

    def keep_probabilities(
        self, codes: torch.Tensor, query: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        return torch.sigmoid(self.keep_logits(codes, query, mask, grid))
