"""`tprl bench ppo`: PPO's env steps/s, the scorer's busy and the learner's idle fraction, by env runners.

For each runner count, scorer thread count and ``overlap`` setting, in one run: build the algorithm against one scorer
replica, run ``warmup`` iterations, then time ``iterations`` more. Env steps/s counts the steps
sampled over the wall time of the timed iterations (sampling plus learning); the busy fraction is the
scorer replica's time spent scoring over that wall time, the learner's idle fraction the share of it
outside the learner's updates (:class:`~tprl_ray.rl.telemetry.IterationClock`). With ``emulate`` the
replica sleeps for a calibrated GPU cost instead of competing with the env runners for the CPUs.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from pathlib import Path

from tprl_ray.artifacts.atomic import atomic_write_bytes
from tprl_ray.bench.config import PpoBenchConfig


def run_ppo_bench(cfg: PpoBenchConfig) -> dict:
    import ray
    from ray import serve

    from tprl_ray.ray_setup import init_ray
    from tprl_ray.rl.config import PpoConfig
    from tprl_ray.rl.telemetry import IterationClock
    from tprl_ray.rl.train import build_algo, prepare_codes
    from tprl_ray.service.scorer import APP, start_scorer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        init_ray(cfg.ray_address)
        needed = max(cfg.runner_counts) * cfg.cpus_per_runner + PpoConfig().scorer.pool.cpus
        if needed > (cpus := ray.cluster_resources().get("CPU", 0)):
            raise ValueError(
                f"{max(cfg.runner_counts)} env runners x {cfg.cpus_per_runner} CPUs and the scorer replica need "
                f"{needed:g} CPUs, the Ray cluster has {cpus:g}: lower cpus_per_runner"
            )
        for runners, threads, overlap in itertools.product(cfg.runner_counts, cfg.scorer_threads, cfg.overlap):
            ppo = PpoConfig(
                data=cfg.data,
                init=cfg.init,
                out=Path(tmp),
                env_runners=runners,
                envs_per_runner=cfg.envs_per_runner,
                env=cfg.env,
                cpus_per_runner=cfg.cpus_per_runner,
                overlap=overlap,
                train_batch_size=cfg.train_batch_size,
                minibatch_size=min(cfg.minibatch_size, cfg.train_batch_size),
                scorer={"threads": threads, "emulate": cfg.cost.model_dump() if cfg.emulate else None},
            )
            codes_dir, _ = prepare_codes(ppo)
            start_scorer(ppo.scorer, ppo.data)
            algo = build_algo(ppo, codes_dir)
            try:
                clock = IterationClock(algo, replicas=1)
                for _ in range(cfg.warmup):
                    algo.train()
                steps, start = 0, time.perf_counter()
                clock.start()
                for _ in range(cfg.iterations):
                    steps += algo.train()["env_runners"]["num_env_steps_sampled"]
                fractions, wall = clock.stop(), time.perf_counter() - start
            finally:
                algo.stop()
                serve.delete(APP)
            rows.append(
                {
                    "env_runners": runners,
                    "envs_per_runner": cfg.envs_per_runner,
                    "scorer_threads": threads,
                    "overlap": overlap,
                    "emulated": cfg.emulate,
                    "env_steps": int(steps),
                    "seconds": wall,
                    "env_steps_per_s": steps / wall,
                    **fractions,
                }
            )
            print(format_ppo_bench({"rows": rows[-1:]}))
    result = {
        "bench": "ppo",
        "data": str(cfg.data),
        "cost": cfg.cost.model_dump() if cfg.emulate else None,
        "env": cfg.env.model_dump(mode="json"),
        "train_batch_size": cfg.train_batch_size,
        "minibatch_size": cfg.minibatch_size,
        "rows": rows,
    }
    atomic_write_bytes(cfg.out, json.dumps(result, indent=2).encode())
    return result


def format_ppo_bench(result: dict) -> str:
    lines = [
        "| env runners | envs each | scorer | overlap | env steps/s | scorer busy | learner idle | scorer samples/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['env_runners']} | {r['envs_per_runner']} | "
        f"{'emulated' if r['emulated'] else str(r['scorer_threads']) + ' threads'} | "
        f"{'yes' if r['overlap'] else 'no'} | {r['env_steps_per_s']:.1f} | "
        f"{r['scorer_busy_fraction']:.1%} | {r['learner_idle_fraction']:.1%} | {r['scorer_samples_per_s']:.1f} |"
        for r in result["rows"]
    ]
    return "\n".join(lines)


def command(cfg: PpoBenchConfig) -> None:
    """`tprl bench ppo`."""
    print(format_ppo_bench(run_ppo_bench(cfg)))
    print(f"wrote {cfg.out}")
