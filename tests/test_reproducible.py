"""The whole training pipeline, small: the same seed twice gives the same tprl numbers, and `--seeds`
gives the mean and the spread over the seeds with each seed's report beside it."""

import json

import pytest

from tprl_ray.pipeline.config import PipelineConfig
from tprl_ray.pipeline.run import run_pipeline


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_pipeline):
    import ray

    root = tmp_path_factory.mktemp("repro")
    small = {**small_pipeline, "ppo": {"iterations": 2}, "ray_address": "local"}
    try:
        seeded = run_pipeline(PipelineConfig.load(None, {**small, "out": str(root / "seeds"), "seeds": [0, 1]}))
        single = run_pipeline(PipelineConfig.load(None, {**small, "out": str(root / "single")}))
    finally:
        ray.shutdown()
    return root, seeded, single


def test_the_same_seed_gives_the_same_learned_pruners(runs):
    root, _, single = runs
    again = json.loads((root / "seeds" / "seed-0" / "report.json").read_text())
    for before, after in zip(single["rows"], again["rows"]):
        assert {k: v for k, v in before.items() if k != "metrics"} == {k: v for k, v in after.items() if k != "metrics"}
    for name in ("autoencoder/autoencoder", "lfd/policy", "ppo/policy"):
        assert (root / "single" / f"{name}.safetensors").read_bytes() == (
            root / "seeds" / "seed-0" / f"{name}.safetensors"
        ).read_bytes(), name


def test_seeds_report_the_mean_and_spread(runs):
    root, seeded, _ = runs
    per_seed = [json.loads((root / "seeds" / f"seed-{s}" / "report.json").read_text()) for s in (0, 1)]
    assert json.loads((root / "seeds" / "report.json").read_text()) == seeded and seeded["seeds"] == [0, 1]
    for i, row in enumerate(seeded["rows"]):
        values = [r["rows"][i]["relative"] for r in per_seed]
        assert row["relative"] == pytest.approx(sum(values) / 2) and row["seeds"] == [0, 1]
        assert row["relative_std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    rows = {r["pruner"]: r for r in seeded["rows"]}
    assert rows["vispruner"]["relative_std"] == 0.0  # a rule does not depend on the training seed
    assert (root / "seeds" / "seed-1" / "ppo" / "policy.safetensors").read_bytes() != (
        root / "seeds" / "seed-0" / "ppo" / "policy.safetensors"
    ).read_bytes()
