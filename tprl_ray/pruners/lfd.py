"""The learned pruner (LfD or RL policy) used one-shot, as at inference (SPEC 1.6).

One policy pass over the frozen autoencoder codes of all tokens and the question's query
embedding gives each token a keep probability; the pruner keeps the top ``budget`` tokens, or with
``threshold`` set, every token with ``p > threshold`` (at least one).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tprl_ray.pruners.base import PruneBatch, Pruner, budget_tokens


class LearnedPruner(Pruner):
    name = "lfd"
    needs_query = True

    def __init__(self, directory: str | Path, threshold: float | None = None):
        from tprl_ray.policy.autoencoder import TokenAutoencoder
        from tprl_ray.policy.networks import PolicyValueNet
        from tprl_ray.training.common import load_exported

        self.encoder, self.autoencoder_card = load_exported(TokenAutoencoder, Path(directory), "autoencoder")
        self.policy, self.card = load_exported(PolicyValueNet, Path(directory), "policy")
        self.threshold = threshold

    def flops(self, n: int, kept: int, d_llm: int, d_v: int) -> float:
        """The encoder on every token, then one policy pass (attention over ``n + 1`` tokens, the head)."""
        ae, policy = self.encoder.dims, self.policy.dims
        d, hidden = policy["d_latent"], policy["hidden"]
        encoder = 2.0 * n * (ae["d_v"] * ae["hidden"] + ae["hidden"] * ae["d_latent"])
        attention = 2.0 * (n + 1) * 4 * d * d + 2.0 * 2 * (n + 1) ** 2 * d if policy["attention"] else 0.0
        return encoder + 2.0 * policy["d_query"] * d + attention + 2.0 * n * (2 * d * hidden + d)

    @torch.no_grad()
    def keep_probabilities(self, features: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        d_v = self.encoder.dims["d_v"]
        if features.shape[-1] != d_v:
            raise ValueError(f"features are {features.shape[-1]}-wide but the autoencoder expects {d_v}-wide ones")
        codes = self.encoder.encode(features.float().cpu())[None]
        mask = torch.ones(codes.shape[:2], dtype=torch.bool)
        return self.policy.keep_probabilities(codes, query.float().cpu()[None], mask)[0]

    def select(self, batch: PruneBatch, budget: float | int) -> list[torch.Tensor]:
        if batch.queries is None:
            raise ValueError("the learned pruner needs the query embeddings (PruneBatch.queries)")
        out = []
        for features, query in zip(batch.features, batch.queries):
            p = self.keep_probabilities(features, query)
            keep = (p > self.threshold).nonzero()[:, 0] if self.threshold is not None else \
                p.topk(budget_tokens(budget, p.numel())).indices
            out.append((keep if keep.numel() else p.argmax()[None]).to(features.device))
        return out
