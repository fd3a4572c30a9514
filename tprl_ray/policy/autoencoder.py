"""The token-wise autoencoder that compresses each visual token into the policy's state (docs/design.md §1.1).

``d_v -> 256 -> d_l`` with LayerNorm and GELU after the hidden layer, and the mirrored decoder
``d_l -> 256 -> d_v``; trained with per-token MSE. Afterwards only the frozen encoder is used: its
codes are the policy's view of the image and never reach the LLM.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenAutoencoder(nn.Module):
    def __init__(self, d_v: int, d_latent: int = 64, hidden: int = 256):
        super().__init__()
        self.dims = {"d_v": d_v, "d_latent": d_latent, "hidden": hidden}
        self.encoder = nn.Sequential(
            nn.Linear(d_v, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, d_latent)
        )
        self.decoder = nn.Sequential(
            nn.Linear(d_latent, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, d_v)
        )

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """``[..., d_v]`` features to ``[..., d_latent]`` codes."""
        return self.encoder(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(features))


def relative_mse(reconstruction: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors over the sum of squared deviations from the per-dimension mean
    (1 - R^2 over every token): 0 is perfect, 1 is no better than predicting the mean token."""
    width = features.shape[-1]
    flat, recon = features.reshape(-1, width).float(), reconstruction.reshape(-1, width).float()
    return ((recon - flat) ** 2).sum() / ((flat - flat.mean(dim=0)) ** 2).sum()
