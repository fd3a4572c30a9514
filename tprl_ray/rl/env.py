"""The pruning MDP of docs/design.md §1.2 as a natively vectorized gymnasium env (one scorer call per step).

Each sub-env plays one sample for ``t_max`` steps (``regime="discount"``), or for one step at a
target kept fraction ``b`` drawn from ``budget_range`` when the episode starts (``regime="budget"``;
``b`` is in the observation and the policy's sampling keeps ``b * N`` tokens in expectation). State:
the frozen codes of all ``N`` tokens, the query embedding, the keep mask over original indices
(tokens with ``mask = 0`` have left the state), the token grid and the step ``t``. Samples with
fewer tokens than the longest are padded: their padding starts (and stays) out of the mask, and
kept fractions and budgets count the sample's own tokens. Action: one keep bit per token
(bits of dropped tokens are ignored). If a step would drop every token, the env keeps one of the
previous step's tokens at random. With ``weights`` (a mixture), an episode's sample is drawn from
dataset ``d`` with probability ``w_d / sum(w)``, uniformly within it. Reward at step ``t`` (``K`` =
kept count, ``Score`` = the scorer's ``logprob`` or ``accuracy`` with the kept tokens, ``Score(H_0)`` from precompute)::

    r_t = alpha * (Score_t - Score_{t-1}) + beta * (1 - K_t / K_{t-1})

group-relative (``reward="group"``, the default, GRPO-style): consecutive groups of ``group_size``
sub-envs play the same sample and each gets its reward minus the mean reward of the others in its
group (and the same ``b``), a leave-one-out baseline that takes the question's difficulty out of
the advantage (``count_neutral`` also fits out the part explained by the kept count); per
sample (``reward="sample"``); or both terms averaged over the sub-envs of the step
(``reward="batch"``, the paper's mini-batch mean). Episodes end after their steps; the next
``step`` resets that sub-env (gymnasium's NEXT_STEP autoreset). Observations hold codes and masks
only; the scorer is called with sample ids and masks. Metrics: :mod:`tprl_ray.rl.telemetry`.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import batch_space

from tprl_ray.rl.codes import Codes
from tprl_ray.rl.config import EnvConfig
from tprl_ray.rl.telemetry import EnvTelemetry

ScoreFn = Callable[[list[str], np.ndarray], tuple[np.ndarray, np.ndarray]]


def sample_probabilities(datasets: np.ndarray, weights: dict[str, float]) -> np.ndarray | None:
    """Each sample's probability of being drawn: its dataset's weight over the weights' sum, shared by
    the dataset's samples (None without weights). Every dataset needs a weight and every weight a dataset."""
    if not weights:
        return None
    names, counts = np.unique(datasets.astype(str), return_counts=True)
    if missing := sorted(set(names) - set(weights)):
        raise ValueError(f"env.weights has no weight for dataset(s) {missing} (weights: {weights})")
    if unknown := sorted(set(weights) - set(names)):
        raise ValueError(f"env.weights names dataset(s) {unknown} that the data lacks (it has {list(names)})")
    total = sum(weights[n] for n in names)
    per_sample = {n: weights[n] / total / c for n, c in zip(names, counts)}
    p = np.array([per_sample[d] for d in datasets.astype(str)])
    return p / p.sum()


class PruningVectorEnv(gym.vector.VectorEnv):
    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, codes: Codes, cfg: EnvConfig, num_envs: int, score_fn: ScoreFn, seed: int | None = None):
        cfg.check_envs(num_envs)
        self.data, self.cfg, self.num_envs, self.score_fn = codes, cfg, num_envs, score_fn
        m, n, d_latent = codes.codes.shape
        self.n_tokens = n
        self.single_observation_space = spaces.Dict(
            {
                "codes": spaces.Box(-np.inf, np.inf, (n, d_latent), np.float32),
                "query": spaces.Box(-np.inf, np.inf, codes.query.shape[1:], np.float32),
                "mask": spaces.Box(0.0, 1.0, (n,), np.float32),
                "grid": spaces.Box(0.0, float(n), (2,), np.float32),
                "step": spaces.Box(0.0, float(cfg.steps), (1,), np.float32),
                **({"budget": spaces.Box(0.0, 1.0, (1,), np.float32)} if cfg.regime == "budget" else {}),
            }
        )
        self.single_action_space = spaces.MultiBinary(n)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.rng = np.random.default_rng(seed)
        self.draw_p = sample_probabilities(codes.dataset, cfg.weights)
        self.index = np.zeros(num_envs, dtype=np.int64)
        self.mask = np.ones((num_envs, n), dtype=bool)
        self.t = np.zeros(num_envs, dtype=np.int64)
        self.prev_score = np.zeros(num_envs, dtype=np.float32)
        self.budget = np.zeros(num_envs, dtype=np.float32)
        self.done = np.zeros(num_envs, dtype=bool)
        self.telemetry = EnvTelemetry(num_envs)

    def _full_score(self, index: np.ndarray) -> np.ndarray:
        if self.cfg.score == "logprob":
            return self.data.full_logp[index]
        return self.data.full_correct[index].astype(np.float32)

    def _start(self, envs: np.ndarray) -> None:
        if self.cfg.reward == "group":  # all sub-envs restart together (every episode lasts the same steps)
            draws = self._draw(self.num_envs // self.cfg.group_size)
            slot = envs // self.cfg.group_size
        else:
            draws, slot = self._draw(len(envs)), np.arange(len(envs))
        self.index[envs] = draws[slot]
        if self.cfg.regime == "budget":  # the discount regime draws no budgets: its random stream is unchanged
            self.budget[envs] = self.rng.uniform(*self.cfg.budget_range, size=len(draws))[slot]
        self.mask[envs] = self.data.token_mask(self.index[envs])
        self.t[envs] = 0
        self.prev_score[envs] = self._full_score(self.index[envs])
        self.done[envs] = False
        self.telemetry.start(envs)

    def _draw(self, size: int) -> np.ndarray:
        if self.draw_p is None:  # the draws before mixtures existed: the same random stream
            return self.rng.integers(0, len(self.data.ids), size=size)
        return self.rng.choice(len(self.data.ids), size=size, p=self.draw_p)

    def _obs(self) -> dict:
        return {
            "codes": self.data.codes[self.index].astype(np.float32),
            "query": self.data.query[self.index],
            "mask": self.mask.astype(np.float32),
            "grid": self.data.grids[self.index].astype(np.float32),
            "step": self.t[:, None].astype(np.float32),
            **({"budget": self.budget[:, None].copy()} if self.cfg.regime == "budget" else {}),
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self._start(np.arange(self.num_envs))
        return self._obs(), {}

    def step(self, actions):
        restarting = self.done.copy()
        playing = ~restarting
        rewards = np.zeros(self.num_envs, dtype=np.float32)
        if playing.any():
            rewards[playing] = self._play(np.flatnonzero(playing), np.asarray(actions, dtype=bool)[playing])
        self._start(np.flatnonzero(restarting))
        terminated = self.done & playing
        self.telemetry.record(playing, rewards, terminated, self.mask, self.data.counts[self.index])
        return self._obs(), rewards, terminated, np.zeros(self.num_envs, dtype=bool), {}

    def _play(self, envs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        before = self.mask[envs]
        after = before & actions
        for row in np.flatnonzero(~after.any(axis=1)):  # never an empty image: keep one token back
            after[row, self.rng.choice(np.flatnonzero(before[row]))] = True
        with self.telemetry.scoring():
            logp, correct = self.score_fn(self.data.ids[self.index[envs]].tolist(), after.astype(np.uint8))
        score = np.asarray(logp if self.cfg.score == "logprob" else correct, dtype=np.float32)
        gain = score - self.prev_score[envs]
        pruned = 1.0 - after.sum(axis=1) / before.sum(axis=1)
        if self.cfg.reward == "batch":
            gain, pruned = np.full_like(gain, gain.mean()), np.full_like(pruned, pruned.mean())
        elif self.cfg.reward == "group":
            gain, pruned = self._relative(envs, gain), self._relative(envs, pruned)
            if self.cfg.count_neutral and self.cfg.regime == "budget":
                gain = self._count_neutral(envs, gain, after.sum(axis=1).astype(np.float64))
        self.mask[envs], self.prev_score[envs] = after, score
        self.t[envs] += 1
        self.done[envs] = self.t[envs] >= self.cfg.steps
        return (self.cfg.alpha * gain + self.cfg.beta * pruned).astype(np.float32)

    def _count_neutral(self, envs: np.ndarray, gain: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """``gain`` less its least-squares fit (through 0) on the relative kept count: more tokens than
        the group's, by sampling noise around ``b * N``, earn nothing."""
        count = self._relative(envs, kept)
        spread = float(count @ count)
        return gain if spread == 0.0 else gain - float(gain @ count) / spread * count

    def _relative(self, envs: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``x`` minus the mean of the other sub-envs of its group (the groups of ``envs`` are whole)."""
        size = self.cfg.group_size
        groups = envs // size
        totals = np.bincount(groups, weights=x)[groups]
        return x - (totals - x) / (size - 1)
