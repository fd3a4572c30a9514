"""Prometheus metrics of the PPO stage's env runners and driver, through ``ray.util.metrics``.

Ray exports them with a ``ray_`` prefix (counters get ``_total``, histograms ``_bucket``/``_sum``/``_count``)
and with the tags it puts on every metric (``SessionName``, ``NodeAddress``, ``WorkerId``, ...); we add no
tags. Metric objects are made on first use and only in a process connected to Ray: outside Ray (unit tests)
nothing is recorded.

Env runners (:class:`EnvTelemetry`, one per :class:`~tprl_ray.rl.env.PruningVectorEnv`):

- ``tprl_env_steps`` (Counter): sub-env steps played (autoreset steps not counted)
- ``tprl_env_episodes`` (Counter): episodes finished
- ``tprl_env_episode_return`` (Gauge): mean return of the episodes that ended at the latest step where any
  ended (a Gauge: Ray's histograms take positive bucket boundaries only, returns are mostly negative)
- ``tprl_env_kept_fraction`` (Histogram): fraction of tokens each finished episode kept at its end
- ``tprl_env_scorer_latency_s`` (Histogram): seconds per scorer call as the env sees it (queueing included)

Driver (:func:`record_iteration`, after each PPO iteration), Gauges ``tprl_ppo_<key>`` for the keys of
:data:`ITERATION_GAUGES`; :class:`IterationClock` measures the scorer's busy and the learner's idle
fraction of a span of iterations.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import ray
from ray.util import metrics

ITERATION_GAUGES = {
    "iteration": "PPO iterations done",
    "policy_loss": "PPO policy loss of the last iteration",
    "vf_loss": "value-function loss of the last iteration",
    "entropy": "policy entropy (summed over tokens) of the last iteration",
    "vf_explained_var": "explained variance of the value function",
    "episode_return_mean": "mean episode return reported by the env runners",
    "kept_fraction": "mean kept fraction of the episodes' last states",
    "env_steps": "env steps sampled since the start of training",
    "env_steps_per_s": "env steps sampled per second during the last iteration",
    "iteration_s": "seconds the last iteration took",
    "scorer_busy_fraction": "fraction of the last iteration the scorer replicas spent scoring (mean over replicas)",
    "learner_idle_fraction": "fraction of the last iteration the learner did not spend updating",
}


@lru_cache(maxsize=1)
def env_metrics() -> dict:
    return {
        "steps": metrics.Counter("tprl_env_steps", "sub-env steps played"),
        "episodes": metrics.Counter("tprl_env_episodes", "episodes finished"),
        "return": metrics.Gauge("tprl_env_episode_return", "mean return of the latest finished episodes"),
        "kept": metrics.Histogram(
            "tprl_env_kept_fraction",
            "fraction of tokens a finished episode kept",
            boundaries=[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
        ),
        "latency": metrics.Histogram(
            "tprl_env_scorer_latency_s",
            "seconds per scorer call seen by the env",
            boundaries=[0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30],
        ),
    }


@lru_cache(maxsize=1)
def iteration_gauges() -> dict:
    return {key: metrics.Gauge(f"tprl_ppo_{key}", text) for key, text in ITERATION_GAUGES.items()}


class EnvTelemetry:
    """Records one vector env's metrics; keeps the running return of each sub-env's episode."""

    def __init__(self, num_envs: int):
        self.returns = np.zeros(num_envs, dtype=np.float64)

    def start(self, envs: np.ndarray) -> None:
        """Episodes begin in ``envs``."""
        self.returns[envs] = 0.0

    @contextmanager
    def scoring(self):
        """Times one scorer call."""
        start = time.perf_counter()
        yield
        if ray.is_initialized():
            env_metrics()["latency"].observe(time.perf_counter() - start)

    def record(
        self, played: np.ndarray, rewards: np.ndarray, terminated: np.ndarray, mask: np.ndarray, counts: np.ndarray
    ) -> None:
        """After a step: ``played`` sub-envs acted, ``terminated`` ones ended with keep ``mask`` over their
        ``counts`` tokens."""
        self.returns += rewards
        if not ray.is_initialized():
            return
        m = env_metrics()
        if played.any():
            m["steps"].inc(int(played.sum()))
        if terminated.any():
            m["episodes"].inc(int(terminated.sum()))
            m["return"].set(float(self.returns[terminated].mean()))
        for kept in mask[terminated].sum(axis=1) / counts[terminated]:
            m["kept"].observe(float(kept))


def record_iteration(result: dict, iteration: int) -> None:
    """Set the driver's gauges from one iteration's curated metrics (missing keys keep their last value)."""
    gauges = iteration_gauges()
    for key, value in {**result, "iteration": iteration}.items():
        if key in gauges:
            gauges[key].set(float(value))


class IterationClock:
    """The scorer's busy fraction (its replicas' summed busy seconds over wall time and replicas), the
    learner's idle fraction and the samples scored per second, over the span from :meth:`start` to
    :meth:`stop`. The learner is timed by wrapping ``algo.learner_group.update``."""

    def __init__(self, algo, replicas: int):
        self.replicas, self.learning = replicas, 0.0
        update = algo.learner_group.update

        def timed_update(*args, **kwargs):
            start = time.perf_counter()
            try:
                return update(*args, **kwargs)
            finally:
                self.learning += time.perf_counter() - start

        algo.learner_group.update = timed_update

    def start(self) -> None:
        from tprl_ray.service.scorer import scorer_clock

        self.scorer, self.learned, self.started = scorer_clock(), self.learning, time.perf_counter()

    def stop(self) -> dict:
        from tprl_ray.service.scorer import scorer_clock

        wall, scorer = time.perf_counter() - self.started, scorer_clock()
        return {
            "scorer_busy_fraction": (scorer["busy_s"] - self.scorer["busy_s"]) / (wall * self.replicas),
            "scorer_samples_per_s": (scorer["samples"] - self.scorer["samples"]) / wall,
            "learner_idle_fraction": 1.0 - (self.learning - self.learned) / wall,
        }
