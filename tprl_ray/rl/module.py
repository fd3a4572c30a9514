"""The RLlib side of the policy: a per-token Bernoulli action distribution and the RLModule.

Observations (see :mod:`tprl_ray.rl.env`) are ``codes [B, N, d_l]``, ``query [B, d_q]``, ``mask [B, N]``
(tokens still kept; padding never), ``grid [B, 2]`` (each sample's token grid), ``step [B, 1]`` (``t``)
and, in the budget regime, ``budget [B, 1]`` (``b``). The
module runs :class:`PolicyValueNet` over the kept tokens and turns each keep logit ``l_i`` into the
sampling probability of docs/design.md §1.5: ``sigmoid(l_i + c)`` with the shift that keeps ``b * N``
tokens in expectation (budget regime), or ``lambda_disc ** t * sigmoid(l_i)`` (discount regime);
tokens already dropped get a keep probability of zero. The action distribution's inputs are those
probabilities as logits, so RLlib's PPO loss, entropy and KL all see the policy that was sampled.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchDeterministic, TorchDistribution
from ray.rllib.core.rl_module.apis import ValueFunctionAPI
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch.nn import functional as F

from tprl_ray.policy.networks import PolicyValueNet

DROPPED_LOGIT = -30.0  # keep probability ~1e-13: a dropped token is never sampled back in


class TokenBernoulli(TorchDistribution):
    """Independent keep/drop bits, one per token; ``logp`` and ``entropy`` are summed over tokens."""

    def _get_torch_distribution(self, logits: torch.Tensor) -> torch.distributions.Distribution:
        return torch.distributions.Independent(torch.distributions.Bernoulli(logits=logits), 1)

    def logp(self, value: torch.Tensor, **kwargs) -> torch.Tensor:
        return self._dist.log_prob(value.float())

    @staticmethod
    def required_input_dim(space, **kwargs) -> int:
        return int(space.n)

    def to_deterministic(self) -> TorchDeterministic:
        return TorchDeterministic(loc=(self._dist.base_dist.logits > 0).float())


def sampling_logits(
    keep_logits: torch.Tensor, mask: torch.Tensor, step: torch.Tensor, lambda_disc: float
) -> torch.Tensor:
    """Logits of ``lambda_disc ** t * sigmoid(keep_logits)`` for kept tokens, :data:`DROPPED_LOGIT` for
    dropped ones (``mask`` bool ``[B, N]``, ``step`` ``[B]``)."""
    log_q = F.logsigmoid(keep_logits) + step[:, None] * math.log(lambda_disc)
    log_q = log_q.clamp(max=math.log1p(-1e-6))
    logits = log_q - torch.log1p(-log_q.exp())
    return torch.where(mask, logits, torch.full_like(logits, DROPPED_LOGIT))


def budget_logits(keep_logits: torch.Tensor, mask: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Logits of ``sigmoid(keep_logits + c)`` for kept tokens, with the per-row shift ``c`` (no
    gradient) that makes the expected kept count ``budget * kept`` (``budget`` ``[B]``); dropped tokens
    get :data:`DROPPED_LOGIT`."""
    with torch.no_grad():
        target = budget * mask.sum(dim=1)
        # c = low keeps (almost) nothing, c = high (almost) everything, whatever the logits' scale
        low = -keep_logits.masked_fill(~mask, -torch.inf).amax(dim=1) - 30.0
        high = -keep_logits.masked_fill(~mask, torch.inf).amin(dim=1) + 30.0
        for _ in range(60):  # bisection: the expected count is increasing in c
            mid = (low + high) / 2
            below = (torch.sigmoid(keep_logits + mid[:, None]) * mask).sum(dim=1) < target
            narrowed = torch.where(below, mid, low), torch.where(below, high, mid)
            if torch.equal(narrowed[0], low) and torch.equal(narrowed[1], high):
                break  # a fixed point at float resolution (~30 steps): the remaining steps would change nothing
            low, high = narrowed
    logits = keep_logits + ((low + high) / 2)[:, None]
    return torch.where(mask, logits, torch.full_like(logits, DROPPED_LOGIT))


class PruningModule(TorchRLModule, ValueFunctionAPI):
    """PPO's policy and value function: :class:`PolicyValueNet` built from ``model_config["dims"]``,
    initialised from ``model_config["init"]`` (a directory with ``policy.safetensors``, e.g. the LfD
    export) when given."""

    def setup(self):
        from safetensors.torch import load_file

        self.net = PolicyValueNet(**self.model_config["dims"])
        self.lambda_disc = float(self.model_config["lambda_disc"])
        self.critic = bool(self.model_config.get("critic", True))
        self.steps = float(self.model_config["steps"])  # an episode's length (EnvConfig.steps)
        init = self.model_config.get("init")
        if init:
            self.net.load_state_dict(load_file(str(Path(init) / "policy.safetensors")))

    @staticmethod
    def _state(obs: dict) -> tuple[torch.Tensor, ...]:
        return obs["codes"].float(), obs["query"].float(), obs["mask"] > 0.5, obs["grid"].round().long()

    def _sampling(self, obs: dict, f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self.net.logits(f)
        if "budget" in obs:
            return budget_logits(logits, mask, obs["budget"][:, 0].float())
        return sampling_logits(logits, mask, obs["step"][:, 0].float(), self.lambda_disc)

    def _forward(self, batch: dict, **kwargs) -> dict:
        """The env runners' pass. An episode's last observation (``step == steps``) is acted on only by the
        env's autoreset, which ignores the action: those rows skip the network (with one-step episodes,
        every other pass) and get :data:`DROPPED_LOGIT`."""
        obs = batch[Columns.OBS]
        playing = obs["step"][:, 0] < self.steps
        out = torch.full(obs["mask"].shape, DROPPED_LOGIT, dtype=torch.float32, device=obs["mask"].device)
        if playing.any():
            live = {k: v[playing] for k, v in obs.items()}
            codes, query, mask, grid = self._state(live)
            out[playing] = self._sampling(live, self.net.features(codes, query, mask, grid), mask)
        return {Columns.ACTION_DIST_INPUTS: out}

    def _forward_train(self, batch: dict, **kwargs) -> dict:
        obs = batch[Columns.OBS]
        codes, query, mask, grid = self._state(obs)
        f = self.net.features(codes, query, mask, grid)
        return {Columns.ACTION_DIST_INPUTS: self._sampling(obs, f, mask), Columns.EMBEDDINGS: self.net.pool(f, mask)}

    def compute_values(self, batch: dict, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        if not self.critic:  # no critic: GAE's advantages are the returns
            return torch.zeros(batch[Columns.OBS]["mask"].shape[0], device=batch[Columns.OBS]["mask"].device)
        if embeddings is None:
            codes, query, mask, grid = self._state(batch[Columns.OBS])
            embeddings = self.net.pool(self.net.features(codes, query, mask, grid), mask)
        return self.net.value(embeddings)

    def get_train_action_dist_cls(self):
        return TokenBernoulli

    def get_exploration_action_dist_cls(self):
        return TokenBernoulli

    def get_inference_action_dist_cls(self):
        return TokenBernoulli
