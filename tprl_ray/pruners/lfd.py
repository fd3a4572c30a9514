"""The learned pruners (LfD and TPRL policies) used one-shot, as at inference (docs/design.md §1.6).

One policy pass over the frozen autoencoder codes of all tokens and the question's query
embedding gives each token a keep logit. ``lfd`` keeps the top ``budget`` tokens by logit, or with
``threshold`` set, every token with ``p > threshold``. ``tprl`` trained in the ``budget`` regime
keeps the top ``budget`` tokens too; trained in the ``discount`` regime it keeps every token with
``p > tau``, ``tau`` calibrated on validation data so that the *average* kept fraction is the
budget (the count varies per question). At least one token is always kept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tprl_ray.pruners.base import PruneBatch, Pruner, budget_tokens


class LearnedPruner(Pruner):
    name = "lfd"
    needs_query = True

    def __init__(self, directory: str | Path, threshold: float | None = None):
        from tprl_ray.artifacts.export import load_exported
        from tprl_ray.policy.autoencoder import TokenAutoencoder
        from tprl_ray.policy.networks import PolicyValueNet

        self.directory = Path(directory)
        self.encoder, self.autoencoder_card = load_exported(TokenAutoencoder, self.directory, "autoencoder")
        self.policy, self.card = load_exported(PolicyValueNet, self.directory, "policy")
        if self.policy.dims["d_latent"] != self.encoder.dims["d_latent"]:
            raise ValueError(
                f"{self.directory}: the policy reads {self.policy.dims['d_latent']}-wide codes, "
                f"its autoencoder writes {self.encoder.dims['d_latent']}-wide ones"
            )
        self.threshold = threshold

    def flops(self, n: int, kept: int, d_llm: int, d_v: int, text_tokens: int = 0) -> float:
        """The encoder on every token, then one policy pass (attention over ``n + 1`` tokens, the head)."""
        ae, policy = self.encoder.dims, self.policy.dims
        d, hidden = policy["d_latent"], policy["hidden"]
        encoder = 2.0 * n * (ae["d_v"] * ae["hidden"] + ae["hidden"] * ae["d_latent"])
        attention = 2.0 * (n + 1) * 4 * d * d + 2.0 * 2 * (n + 1) ** 2 * d if policy["attention"] else 0.0
        return encoder + 2.0 * policy["d_query"] * d + attention + 2.0 * n * (2 * d * hidden + d)

    def check_widths(self, feature_width: int, embedding_width: int) -> None:
        """Refuse a model whose vision features or LLM embeddings are not the widths this pruner was trained on."""
        d_v, d_query = self.encoder.dims["d_v"], self.policy.dims["d_query"]
        if (d_v, d_query) != (feature_width, embedding_width):
            raise ValueError(
                f"{self.name} pruner of {self.directory} was trained on {d_v}-wide vision features and "
                f"{d_query}-wide embeddings; this model has {feature_width} and {embedding_width}"
            )

    @torch.no_grad()
    def keep_logits(
        self, features: torch.Tensor, query: torch.Tensor, grid: tuple[int, int], mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each token's keep logit (``sigmoid`` of it is the keep probability), given the tokens still
        kept (``mask`` ``[N]`` bool; default: all of them)."""
        d_v = self.encoder.dims["d_v"]
        if features.shape[-1] != d_v:
            raise ValueError(f"features are {features.shape[-1]}-wide but the autoencoder expects {d_v}-wide ones")
        codes = self.encoder.encode(features.float().cpu())[None]
        mask = torch.ones(codes.shape[:2], dtype=torch.bool) if mask is None else mask.cpu()[None]
        return self.policy.keep_logits(codes, query.float().cpu()[None], mask, tuple(grid))[0]

    def tau(self, budget: float | int, n: int) -> float | None:
        """The keep threshold for ``budget`` of ``n`` tokens (None: top-k)."""
        return self.threshold

    def select(self, batch: PruneBatch, budget: float | int) -> list[torch.Tensor]:
        if batch.queries is None:
            raise ValueError("the learned pruner needs the query embeddings (PruneBatch.queries)")
        out = []
        for features, query, grid in zip(batch.features, batch.queries, batch.grids):
            logits = self.keep_logits(features, query, grid)
            tau = self.tau(budget, logits.numel())
            if tau is None:  # top-k by logit: no ties where the probabilities saturate at 1
                keep = logits.topk(budget_tokens(budget, logits.numel())).indices
            else:
                keep = (torch.sigmoid(logits) > tau).nonzero()[:, 0]
            out.append((keep if keep.numel() else logits.argmax()[None]).to(features.device))
        return out


def tau_for_budget(quantiles: list[float], budget: float) -> float:
    """The threshold whose kept fraction, over the calibration tokens, is ``budget``."""
    return float(np.interp(1.0 - budget, np.linspace(0.0, 1.0, len(quantiles)), quantiles))


class TprlPruner(LearnedPruner):
    """The PPO policy (``tprl train ppo`` export), thresholded at the calibrated ``tau``."""

    name = "tprl"

    def __init__(self, directory: str | Path):
        super().__init__(directory)
        self.top_k = self.card.get("regime") == "budget"  # trained at the budget it is used at
        if not self.top_k and "keep_quantiles" not in self.card:
            raise ValueError(f"{directory}: policy.json has no tau calibration (not a `tprl train ppo` export)")

    def tau(self, budget: float | int, n: int) -> float | None:
        if self.threshold is not None:  # an explicit tau (tprl serve --tau)
            return self.threshold
        if self.top_k:
            return None
        fraction = budget if isinstance(budget, float) else budget_tokens(budget, n) / n
        return tau_for_budget(self.card["keep_quantiles"], fraction)
