"""`tprl bench scorer` runs for real on small settings and writes its JSON (no timing thresholds)."""

import json

from tprl_ray.bench.config import ScorerBenchConfig
from tprl_ray.bench.scorer import format_bench, run_scorer_bench


def test_scorer_bench_writes_rows_and_ratios(tmp_path):
    cfg = ScorerBenchConfig(
        out=tmp_path / "scorer.json", models=["tiny"], batch_sizes=[1, 4], fractions=[1.0, 0.25], min_seconds=0.05
    )
    result = run_scorer_bench(cfg)
    assert json.loads(cfg.out.read_text()) == result
    cells = {(r["batch"], r["fraction"]) for r in result["rows"]}
    assert cells == {(1, 1.0), (1, 0.25), (4, 1.0), (4, 0.25)}
    assert all(r["samples_per_s"] > 0 for r in result["rows"])
    assert set(result["ratios"]["tiny"]) == {
        "batch4_over_batch1",
        "frac0.25_over_1.0_batch1",
        "frac0.25_over_1.0_batch4",
    }
    assert "tiny" in format_bench(result)


def test_latency_bench_writes_rows_and_the_prefill_ratio(tmp_path):
    from tprl_ray.bench.config import LatencyBenchConfig
    from tprl_ray.bench.latency import format_latency, run_latency_bench

    cfg = LatencyBenchConfig(out=tmp_path / "latency.json", models=["tiny"], new_tokens=2, repeats=1)
    result = run_latency_bench(cfg)
    assert json.loads(cfg.out.read_text()) == result
    assert [(r["fraction"], r["kept_tokens"]) for r in result["rows"]] == [(1.0, 64), (0.25, 16)]
    assert all(r["prefill_ms"] > 0 and r["decode_ms_per_token"] >= 0 for r in result["rows"])
    assert "prefill_speedup_0.25_vs_1.0" in result["ratios"]["tiny"] and "tiny" in format_latency(result)
