"""`tprl bench latency`: measured prefill latency and per-token decode latency, by kept fraction.

One sample at a time (batch 1, the interactive case), on the shipped tiny model and on the
7B-shaped model of `tprl bench scorer`. Prefill is a greedy ``generate`` of one token (the vision
tower is outside: tokens come precomputed); decode is the extra time of ``1 + new_tokens`` forced
steps over that, per step. Each cell reports the median of ``repeats`` timings.
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from tqdm.auto import tqdm

from tprl_ray.artifacts.atomic import atomic_write_bytes
from tprl_ray.bench.config import LatencyBenchConfig
from tprl_ray.bench.scorer import device_name, workloads
from tprl_ray.pruners.random import random_keep


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_latency(backbone, tokens, question: str, fraction: float, new_tokens: int, repeats: int) -> dict:
    tokens = tokens[:1]
    keep = random_keep(tokens, fraction)
    prefill = _median_seconds(lambda: backbone.generate([question], tokens, keep, max_new_tokens=1), repeats)
    total = _median_seconds(
        lambda: backbone.generate([question], tokens, keep, max_new_tokens=1 + new_tokens, stop_at_end=False), repeats
    )
    return {
        "kept_tokens": len(keep[0]),
        "prefill_ms": 1e3 * prefill,
        "decode_ms_per_token": 1e3 * max(0.0, total - prefill) / new_tokens,
    }


def run_latency_bench(cfg: LatencyBenchConfig) -> dict:
    rows, ratios = [], {}
    for name, make in workloads(cfg).items():
        backbone, tokens, questions, _ = make()
        for fraction in tqdm(cfg.fractions, desc=f"latency {name}", unit="cell"):
            cell = time_latency(backbone, tokens, questions[0], fraction, cfg.new_tokens, cfg.repeats)
            rows.append({"model": name, "fraction": fraction, **cell})
        by_fraction = {r["fraction"]: r for r in rows if r["model"] == name}
        full, least = max(by_fraction), min(by_fraction)
        ratios[name] = {
            f"prefill_speedup_{least}_vs_{full}": by_fraction[full]["prefill_ms"] / by_fraction[least]["prefill_ms"]
        }
        del backbone, tokens
    result = {
        "bench": "latency",
        "device": device_name(cfg.device),
        "dtype": cfg.dtype,
        "threads": torch.get_num_threads(),
        "new_tokens": cfg.new_tokens,
        "rows": rows,
        "ratios": ratios,
    }
    atomic_write_bytes(cfg.out, json.dumps(result, indent=2).encode())
    return result


def format_latency(result: dict) -> str:
    lines = [f"{'model':>15} | {'kept':>5} | {'tokens':>6} | {'prefill ms':>10} | {'decode ms/tok':>13}", "-" * 62]
    lines += [
        f"{r['model']:>15} | {r['fraction']:>5.2f} | {r['kept_tokens']:>6} | {r['prefill_ms']:>10.2f} | "
        f"{r['decode_ms_per_token']:>13.2f}"
        for r in result["rows"]
    ]
    lines += [f"{m}: " + ", ".join(f"{k} {v:.2f}x" for k, v in d.items()) for m, d in result["ratios"].items()]
    return "\n".join(lines)


def command(cfg: LatencyBenchConfig) -> None:
    """`tprl bench latency`."""
    print(format_latency(run_latency_bench(cfg)))
    print(f"wrote {cfg.out}")
