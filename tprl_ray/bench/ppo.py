"""`tprl bench ppo`: PPO's env steps/s and the scorer's busy fraction, by number of env runners.

For each runner count (and scorer thread count), in one run: build the algorithm against one scorer
replica, run ``warmup`` iterations, then time ``iterations`` more. Env steps/s counts the steps
sampled over the wall time of the timed iterations (sampling plus learning); the busy fraction is the
scorer replica's time spent scoring over that wall time (:meth:`Scorer.stats`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from tprl_ray.artifacts.atomic import atomic_write_bytes
from tprl_ray.bench.config import PpoBenchConfig


def run_ppo_bench(cfg: PpoBenchConfig) -> dict:
    from ray import serve

    from tprl_ray.ray_setup import init_ray
    from tprl_ray.rl.config import PpoConfig
    from tprl_ray.rl.train import build_algo, prepare_codes
    from tprl_ray.service.scorer import APP, scorer_handle, start_scorer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        init_ray(cfg.ray_address)
        for runners, threads in [(r, t) for r in cfg.runner_counts for t in cfg.scorer_threads]:
            ppo = PpoConfig(
                data=cfg.data,
                init=cfg.init,
                out=Path(tmp),
                env_runners=runners,
                envs_per_runner=cfg.envs_per_runner,
                cpus_per_runner=0.5,
                scorer={"threads": threads},
            )
            codes_dir, _ = prepare_codes(ppo)
            start_scorer(ppo.scorer, ppo.data)
            algo = build_algo(ppo, codes_dir)
            try:
                for _ in range(cfg.warmup):
                    algo.train()
                before, steps, start = scorer_handle().stats.remote().result(), 0, time.perf_counter()
                for _ in range(cfg.iterations):
                    steps += algo.train()["env_runners"]["num_env_steps_sampled"]
                wall = time.perf_counter() - start
                after = scorer_handle().stats.remote().result()
            finally:
                algo.stop()
                serve.delete(APP)
            rows.append(
                {
                    "env_runners": runners,
                    "envs_per_runner": cfg.envs_per_runner,
                    "scorer_threads": threads,
                    "env_steps": int(steps),
                    "seconds": wall,
                    "env_steps_per_s": steps / wall,
                    "scorer_busy_fraction": (after["busy_s"] - before["busy_s"]) / wall,
                    "scorer_samples_per_s": (after["samples"] - before["samples"]) / wall,
                }
            )
            print(format_ppo_bench({"rows": rows[-1:]}))
    result = {"bench": "ppo", "data": str(cfg.data), "rows": rows}
    atomic_write_bytes(cfg.out, json.dumps(result, indent=2).encode())
    return result


def format_ppo_bench(result: dict) -> str:
    lines = [
        "| env runners | envs each | scorer threads | env steps/s | scorer busy | scorer samples/s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['env_runners']} | {r['envs_per_runner']} | {r['scorer_threads']} | {r['env_steps_per_s']:.1f} | "
        f"{r['scorer_busy_fraction']:.1%} | {r['scorer_samples_per_s']:.1f} |"
        for r in result["rows"]
    ]
    return "\n".join(lines)


def command(cfg: PpoBenchConfig) -> None:
    """`tprl bench ppo`."""
    print(format_ppo_bench(run_ppo_bench(cfg)))
    print(f"wrote {cfg.out}")
