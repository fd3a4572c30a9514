"""The model service's scorer: LVLM replicas behind Ray Serve, scoring keep masks by sample id (the PPO reward).

Each env step sends one request: the sub-envs' sample ids and keep masks over original token
indices (``uint8 [B, N]``, a sample with fewer than ``N`` tokens padded with zeros). ``@serve.batch``
merges the requests of every env runner that arrive within ``batch_wait_s``; the replica then
rebuilds the LLM input of the kept tokens from the stored inputs (LLaVA: the projector over the
pre-projector features; Qwen2.5-VL: the stored post-merger ``llm_tokens`` at their original M-RoPE
positions, from the sample's grid) and scores the reference answers in chunks of ``pool.batch_size``
samples. Stored inputs are read from the precompute shards on first use and kept in an LRU cache of
``cache_shards`` shards, so callers move ids, never tensors.

Callers hold a handle (:func:`handle_score`): one hop from an env runner to a replica. Failures:
Serve restarts a dead replica and routes new requests to the live ones; a request lost with its
replica raises in the env runner, and RLlib recreates that runner's env and plays its episodes
again (``restart_failed_sub_environments``).

With ``emulate`` (benchmarks) a replica loads no model: each forward pass sleeps for the calibrated
cost of :class:`~tprl_ray.service.config.EmulatedCost`, so the callers can be measured on a machine
whose CPUs the scorer would otherwise share.

Metrics (``ray.util.metrics``, exported as ``ray_tprl_scorer_*``): batch size (samples), batch
latency (its rate per replica is the busy fraction), queue length (requests waiting or running), and
a samples counter. Every replica also adds its busy seconds to the :class:`ScorerClock` actor, which
:func:`scorer_clock` reads (the per-iteration busy fraction of PPO and `tprl bench ppo`).
"""

from __future__ import annotations

import asyncio
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from ray import serve

from tprl_ray.service.config import ScorerConfig

APP = "tprl-scorer"
DEPLOYMENT = "Scorer"
CLOCK = "tprl-scorer-clock"
NAMESPACE = "tprl"


@ray.remote(num_cpus=0)
class ScorerClock:
    """Busy seconds and samples scored, summed over the scorer replicas (each adds after each batch)."""

    def __init__(self):
        self.busy_s, self.samples = 0.0, 0

    def add(self, seconds: float, samples: int) -> None:
        self.busy_s, self.samples = self.busy_s + seconds, self.samples + samples

    def totals(self) -> dict:
        return {"busy_s": self.busy_s, "samples": self.samples}


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=64)
class Scorer:
    def __init__(self, cfg: dict, data: str):
        from ray.util import metrics

        from tprl_ray.backbones.load import load_backbone
        from tprl_ray.precompute.schema import shard_files

        self.cfg = ScorerConfig.model_validate(cfg)
        torch.set_num_threads(self.cfg.threads)
        self.backbone = None if self.cfg.emulate else load_backbone(self.cfg.backbone)
        self.clock = ray.get_actor(CLOCK, namespace=NAMESPACE)
        self.shards = shard_files(Path(data))
        self.index = {}
        for s, shard in enumerate(self.shards):
            for r, sample_id in enumerate(pq.read_table(shard, columns=["sample_id"])["sample_id"].to_pylist()):
                self.index[sample_id] = (s, r)
        self._batched.set_max_batch_size(self.cfg.max_batch_requests)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_s)
        read = self._read_stored_scores if self.cfg.emulate else self._read_shard
        self.shard = lru_cache(maxsize=self.cfg.cache_shards)(read)
        self.pending = 0
        self.m_batch = metrics.Histogram(
            "tprl_scorer_batch_size", "samples per scorer batch", boundaries=[1, 8, 16, 32, 64, 128, 256, 512]
        )
        self.m_latency = metrics.Histogram(
            "tprl_scorer_batch_latency_s", "seconds per scorer batch", boundaries=[0.01, 0.03, 0.1, 0.3, 1, 3, 10]
        )
        self.m_queue = metrics.Gauge("tprl_scorer_queue_length", "requests waiting or being scored")
        self.m_samples = metrics.Counter("tprl_scorer_samples", "samples scored")

    def _read_shard(self, s: int) -> tuple[list[torch.Tensor], list[tuple[int, int]], list[str], list[str]]:
        """A shard's stored inputs per row: the scorer's tokens (features to project, or LLM tokens), grid,
        question and answer."""
        from tprl_ray.precompute.schema import token_rows

        column = "features" if self.backbone.projects_features else "llm_tokens"
        if column not in pq.read_schema(self.shards[s]).names:
            raise ValueError(
                f"{self.shards[s]}: no {column} column; this model's scorer rebuilds its LLM input from the stored "
                f"{column}: precompute with this model (tprl precompute) into a new directory"
            )
        table = pq.read_table(self.shards[s], columns=[column, "grid_rows", "grid_cols", "question", "answer"])
        grids = list(zip(table["grid_rows"].to_pylist(), table["grid_cols"].to_pylist()))
        tokens = [torch.from_numpy(t) for t in token_rows(table[column])]
        return tokens, grids, table["question"].to_pylist(), table["answer"].to_pylist()

    def _read_stored_scores(self, s: int) -> tuple[list[int], list[float], list[bool]]:
        """An emulating replica's view of a shard: each row's token count and full-token score."""
        table = pq.read_table(self.shards[s], columns=["grid_rows", "grid_cols", "full_logp", "full_correct"])
        counts = (table["grid_rows"].to_numpy() * table["grid_cols"].to_numpy()).tolist()
        return counts, table["full_logp"].to_pylist(), table["full_correct"].to_pylist()

    def _rows(self, ids: list[str]) -> list[list]:
        """The stored columns of the samples ``ids``, one list per column."""
        rows = []
        for sample_id in ids:
            if sample_id not in self.index:
                raise KeyError(f"sample {sample_id!r} is not in the scorer's precompute dataset")
            s, r = self.index[sample_id]
            rows.append([column[r] for column in self.shard(s)])
        return list(map(list, zip(*rows)))

    def _llm_tokens(self, stored: list[torch.Tensor]) -> list[torch.Tensor]:
        """The LLM-ready tokens of each sample: its features projected (one call for all), or as stored."""
        from tprl_ray.backbones.base import project_rows

        return project_rows(self.backbone, stored) if self.backbone.projects_features else stored

    def _emulated_score(self, ids: list[str], masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sleep for the emulated cost of the forward passes; the synthetic scores of EmulatedCost."""
        counts, full_logp, full_correct = self._rows(ids)
        fractions = masks.sum(axis=1) / np.asarray(counts)
        size = self.cfg.pool.batch_size
        time.sleep(sum(self.cfg.emulate.seconds(fractions[i : i + size]) for i in range(0, len(ids), size)))
        return np.asarray(full_logp, dtype=np.float32) + np.log(fractions).astype(np.float32), np.asarray(full_correct)

    def _score(self, ids: list[str], masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.cfg.emulate:
            return self._emulated_score(ids, masks)
        logps, correct = [], []
        for start in range(0, len(ids), self.cfg.pool.batch_size):
            stored, grids, questions, answers = self._rows(ids[start : start + self.cfg.pool.batch_size])
            chunk = masks[start : start + self.cfg.pool.batch_size]
            if any(len(m) < len(t) or m[len(t) :].any() for m, t in zip(chunk, stored)):
                raise ValueError("each keep mask needs a bit per token of its sample and 0 past its token count")
            keep = [torch.from_numpy(m[: len(t)]).nonzero()[:, 0] for m, t in zip(chunk, stored)]
            logp, ok = self.backbone.score(questions, answers, self._llm_tokens(stored), keep, grids)
            logps.append(logp.numpy())
            correct.append(ok.numpy())
        return np.concatenate(logps), np.concatenate(correct)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, requests: list[tuple[list[str], np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        ids = [i for request_ids, _ in requests for i in request_ids]
        masks = np.concatenate([m for _, m in requests])
        start = time.perf_counter()
        logp, correct = await asyncio.to_thread(self._score, ids, masks)
        elapsed = time.perf_counter() - start
        self.clock.add.remote(elapsed, len(ids))
        self.m_batch.observe(len(ids))
        self.m_latency.observe(elapsed)
        self.m_samples.inc(len(ids))
        out, offset = [], 0
        for request_ids, _ in requests:
            out.append((logp[offset : offset + len(request_ids)], correct[offset : offset + len(request_ids)]))
            offset += len(request_ids)
        return out

    async def score(self, ids: list[str], masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean answer log-likelihood and greedy-correct flag per sample, keeping ``masks[i] > 0``."""
        if masks.ndim != 2 or len(ids) != masks.shape[0] or not masks.any(axis=1).all():
            raise ValueError("one non-empty keep mask per sample id is needed")
        self.pending += 1
        self.m_queue.set(self.pending)
        try:
            return await self._batched((list(ids), masks))
        finally:
            self.pending -= 1
            self.m_queue.set(self.pending)


def start_scorer(cfg: ScorerConfig, data: Path) -> None:
    """Deploy (or update) the scorer application; blocks until its replicas are ready."""
    from tprl_ray.ray_setup import gpus_per_actor

    # detached: a named actor whose handles go out of scope is collected; it ends with the cluster
    ScorerClock.options(name=CLOCK, namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote()
    serve.start(proxy_location="Disabled")
    deployment = Scorer.options(
        num_replicas=cfg.pool.size,
        max_ongoing_requests=max(64, 4 * cfg.max_batch_requests),
        ray_actor_options={
            "num_cpus": cfg.pool.cpus,
            "num_gpus": gpus_per_actor(cfg.pool.gpus),
            "resources": cfg.resources,
            **({"runtime_env": cfg.backbone.vllm.runtime_env} if cfg.backbone.backend == "vllm" else {}),
        },
    )
    app = deployment.bind(cfg.model_dump(), str(Path(data).resolve()))
    serve.run(app, name=APP, route_prefix=None)
    scorer_handle.cache_clear()  # a handle from an earlier deployment or Ray session routes nowhere


@lru_cache(maxsize=1)
def scorer_handle():
    """The scorer app's handle, made once per process and deployment (a handle keeps its router)."""
    return serve.get_deployment_handle(DEPLOYMENT, app_name=APP)


def scorer_clock() -> dict:
    """The replicas' summed busy seconds and samples scored so far."""
    return ray.get(ray.get_actor(CLOCK, namespace=NAMESPACE).totals.remote())


def handle_score(ids: list[str], masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(logp, correct)`` of the keep ``masks`` of samples ``ids``, from the scorer app (one hop)."""
    return scorer_handle().score.remote(list(ids), masks).result(timeout_s=600)
