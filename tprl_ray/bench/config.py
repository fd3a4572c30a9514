"""Configurations of the benchmarks (`tprl bench ...`): each prints a table and writes JSON."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from tprl_ray.config import Command, Dtype, PoolConfig, RayConfig, StageConfig
from tprl_ray.precompute.config import PrecomputeConfig
from tprl_ray.rl.config import EnvConfig, PpoConfig
from tprl_ray.service.config import EmulatedCost, ServeConfig


class WorkloadBenchConfig(StageConfig):
    """What the model benches share: the models to time, kept fractions, device and dtype."""

    models: list[str] = Field(["tiny", "llava-7b-shape"], description="tiny and/or llava-7b-shape")
    fractions: list[float] = Field([1.0, 0.25], description="kept fractions of the visual tokens")
    decoder_layers: int = Field(1, ge=1, description="decoder layers of the 7B-shaped model")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")
    device: str = Field("auto", description="torch device of the models: 'auto' (CUDA when present), 'cpu', ...")
    dtype: Dtype = Field("float32", description="weights and visual tokens of the models")


class ScorerBenchConfig(WorkloadBenchConfig):
    """`tprl bench scorer`: what to time and where to write the JSON."""

    out: Path = Field(Path("runs/bench/scorer.json"), description="JSON result file")
    batch_sizes: list[int] = Field([1, 8, 32, 64], description="batch sizes to time (tiny model)")
    large_batch_sizes: list[int] = Field(
        [1, 8], description="batch sizes for the 7B-shaped model (a batch of 64 full prompts is minutes on a CPU)"
    )
    min_seconds: float = Field(2.0, gt=0, description="time each cell for at least this long")


class LatencyBenchConfig(WorkloadBenchConfig):
    """`tprl bench latency`: what to time and where to write the JSON."""

    out: Path = Field(Path("runs/bench/latency.json"), description="JSON result file")
    decoder_layers: int = Field(2, ge=1, description="decoder layers of the 7B-shaped model")
    new_tokens: int = Field(8, ge=1, description="decode steps timed after the prefill")
    repeats: int = Field(5, ge=1, description="timings per cell (the median is reported)")


class PrecomputeBenchConfig(RayConfig):
    """`tprl bench precompute`: which split, how many questions, where to write."""

    data: Path = Field(Path("runs/demo/data/train"), description="split directory (make demo builds it)")
    limit: int = Field(2000, ge=1, description="questions to precompute with each engine")
    work: Path = Field(Path("runs/bench/precompute-work"), description="scratch output (removed first)")
    out: Path = Field(Path("runs/bench/precompute.json"), description="JSON result file")
    shard_size: int = Field(256, ge=1)
    pool: PoolConfig = Field(
        PrecomputeConfig.model_fields["pool"].default, description="the model's actor pool (precompute's default)"
    )
    projected_samples: int = Field(50_000, ge=1)


class PpoBenchConfig(RayConfig):
    """`tprl bench ppo`."""

    data: Path = Field(Path("runs/demo/precompute/train"), description="precompute dataset")
    init: Path = Field(Path("runs/demo/lfd"), description="LfD export (policy and autoencoder)")
    out: Path = Field(Path("runs/bench/ppo.json"), description="JSON result file")
    runner_counts: list[int] = Field([1, 2], description="env runner counts to compare")
    cpus_per_runner: float = Field(
        0.125, gt=0, description="CPUs each env runner reserves (8 x 0.125 and the replica's 0.5 fit 2 cores)"
    )
    scorer_threads: list[int] = Field([2], description="torch threads of the scorer replica to compare")
    overlap: list[bool] = Field(
        [False, True], description="PPO's overlap settings to compare (sampling during the update or not)"
    )
    envs_per_runner: int = Field(64, ge=1)
    env: EnvConfig = Field(
        EnvConfig(), description="the MDP played (PPO's default; env.regime=discount: the paper's three-step episodes)"
    )
    train_batch_size: int = Field(1024, ge=1, description="env steps per iteration (1024: whole steps for 1-8 runners)")
    minibatch_size: int = Field(
        PpoConfig.model_fields["minibatch_size"].default,
        ge=1,
        description="samples per learner step (PPO's default; cluster/configs/full.yaml uses 256)",
    )
    emulate: bool = Field(False, description="the scorer sleeps for the cost model `cost` instead of running the model")
    cost: EmulatedCost = Field(EmulatedCost(), description="emulate: the scorer's cost model (default: LLaVA-7B, H200)")
    warmup: int = Field(1, ge=0, description="untimed iterations first")
    iterations: int = Field(4, ge=1, description="timed iterations")
    ray_address: str | None = Field("local", description="'local': a private local Ray; None: join or start one")


class ServeBenchConfig(RayConfig):
    """`tprl bench serve`: a bounded load test of the chat endpoint on loopback, by kept fraction and concurrency."""

    wired: ClassVar[frozenset[str]] = frozenset({"model", "backend", "port", "host"})

    model: str = Field(
        "embedded", description="'embedded', a LLaVA checkpoint directory, or 'llava-7b-shape' (random weights)"
    )
    backend: Literal["hf", "vllm"] = Field("hf", description="the language model's backend")
    serve: ServeConfig = Field(ServeConfig(pruner="vispruner"), description="the server the bench starts")
    url: str | None = Field(None, description="bench this running endpoint (loopback only) instead of starting one")
    data: Path = Field(Path("runs/demo/data/test"), description="split whose boards and questions are sent")
    fractions: list[float] = Field([1.0, 0.25], description="kept fractions (each request's budget)")
    concurrency: list[int] = Field([1, 8, 32], description="requests in flight")
    requests: int = Field(64, ge=1, description="timed requests per cell")
    warmup: int = Field(4, ge=0, description="untimed requests per cell first")
    time_limit_s: float = Field(120.0, gt=0, description="a cell stops here even if requests remain")
    max_tokens: int = Field(8, ge=1)
    decoder_layers: int = Field(2, ge=1, description="decoder layers of llava-7b-shape")
    work: Path = Field(Path("runs/bench/serve-work"), description="where llava-7b-shape is written")
    out: Path = Field(Path("runs/bench/serve.json"), description="JSON result file")


COMMANDS = (
    Command(
        ("bench", "ppo"),
        PpoBenchConfig,
        "tprl_ray.bench.ppo:command",
        "PPO env steps/s and scorer busy fraction by env runners",
    ),
    Command(
        ("bench", "scorer"),
        ScorerBenchConfig,
        "tprl_ray.bench.scorer:command",
        "time batched pruned scoring (samples/s)",
    ),
    Command(
        ("bench", "latency"),
        LatencyBenchConfig,
        "tprl_ray.bench.latency:command",
        "measure prefill and per-token decode latency",
    ),
    Command(
        ("bench", "serve"),
        ServeBenchConfig,
        "tprl_ray.bench.serve:command",
        "requests/s and p50/p99 latency of tprl serve by kept fraction and concurrency",
    ),
    Command(
        ("bench", "precompute"),
        PrecomputeBenchConfig,
        "tprl_ray.bench.precompute:command",
        "rows/s of the Ray precompute against a single-process loop; bytes per sample",
    ),
)
