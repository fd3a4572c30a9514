"""`tprl bench precompute`: rows/s of the Ray precompute against a single-process loop over the same data.

Both engines run the same decode and worker steps and write the same shards (end to end: Ray's start-up and the
model loads are inside the timing). The start-up is broken down: when the driver's preparation (the split read and
checked) was done, how long ``ray.init`` took (Ray engine), and when the first model replica was ready (its process
up, imports and model loaded), in seconds from the start; the first shard's computation begins after that. Also
reports the bytes per sample written and the projected size of a 50K-sample LLaVA-1.5-7B dataset (576 tokens of
1024-d fp16 features, 4096-d query, one demonstration mask per schedule step).
"""

from __future__ import annotations

import json
import shutil

from tprl_ray.artifacts.atomic import atomic_write_bytes
from tprl_ray.bench.config import PrecomputeBenchConfig
from tprl_ray.precompute.config import PrecomputeConfig
from tprl_ray.precompute.job import run_precompute


def llava7b_row_bytes(steps: int) -> int:
    """Uncompressed bytes of one LLaVA-1.5-7B row: features, attention, query, masks (scalars excluded)."""
    return 576 * 1024 * 2 + 576 * 4 + 4096 * 4 + steps * 576


def run_precompute_bench(cfg: PrecomputeBenchConfig) -> dict:
    results = {}
    for engine in ("local", "ray"):
        out = cfg.work / engine
        shutil.rmtree(out, ignore_errors=True)
        stage = PrecomputeConfig(
            data=cfg.data,
            out=out,
            limit=cfg.limit,
            shard_size=cfg.shard_size,
            pool=cfg.pool,
            ray_address=cfg.ray_address,
        )
        summary = run_precompute(stage, progress=False, engine=engine)
        files = sum(p.stat().st_size for p in (out / "shards").glob("*.parquet"))
        steady = max(summary["seconds"] - summary["startup_seconds"], 1e-3)
        results[engine] = {
            **summary,
            "rows_per_s": summary["rows"] / summary["seconds"],
            "steady_rows_per_s": summary["rows"] / steady,
            "bytes_per_sample": files / max(1, summary["rows"]),
        }
    steps = len(PrecomputeConfig().demo_schedule)
    per_row = llava7b_row_bytes(steps)
    result = {
        "bench": "precompute",
        "data": str(cfg.data),
        "rows": cfg.limit,
        "engines": results,
        "ray_over_local": results["ray"]["rows_per_s"] / results["local"]["rows_per_s"],
        "ray_over_local_steady": results["ray"]["steady_rows_per_s"] / results["local"]["steady_rows_per_s"],
        "llava7b_row_bytes": per_row,
        "projected_samples": cfg.projected_samples,
        "projected_gb": per_row * cfg.projected_samples / 1e9,
    }
    atomic_write_bytes(cfg.out, json.dumps(result, indent=2).encode())
    return result


def format_precompute_bench(result: dict) -> str:
    lines = [
        f"{'engine':>6} | {'rows':>6} | {'seconds':>8} | {'start-up':>8} | {'prepared':>8} | {'ray.init':>8} | "
        f"{'ready':>8} | {'rows/s':>8} | {'steady':>8} | {'bytes/sample':>12}",
        "-" * 109,
    ]
    lines += [
        f"{name:>6} | {r['rows']:>6} | {r['seconds']:>8.1f} | {r['startup_seconds']:>8.1f} | "
        f"{r['startup']['prepared']:>8.1f} | {r['startup']['ray_init']:>8.1f} | "
        f"{r['startup']['first_worker_ready']:>8.1f} | "
        f"{r['rows_per_s']:>8.1f} | {r['steady_rows_per_s']:>8.1f} | {r['bytes_per_sample']:>12.0f}"
        for name, r in result["engines"].items()
    ]
    lines.append(
        f"ray / local: {result['ray_over_local']:.2f}x end to end, {result['ray_over_local_steady']:.2f}x "
        f"after start-up; LLaVA-1.5-7B: {result['llava7b_row_bytes']} bytes "
        f"per sample, {result['projected_samples']} samples = {result['projected_gb']:.1f} GB"
    )
    return "\n".join(lines)


def command(cfg: PrecomputeBenchConfig) -> None:
    """`tprl bench precompute`."""
    print(format_precompute_bench(run_precompute_bench(cfg)))
    print(f"wrote {cfg.out}")
