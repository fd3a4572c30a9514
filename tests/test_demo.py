"""The demo on the shipped tiny model: report schema, the quality bar, pruning sensitivity, MLflow."""

import json

import mlflow
import pytest

from tprl_ray.demo import DemoConfig, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(DemoConfig(out=out, budgets=[0.25]))


def test_report_schema(demo):
    out, report = demo
    assert json.loads((out / "report.json").read_text()) == report
    assert report["benchmark"] == "digits"
    none, rand = report["rows"]
    assert none["pruner"] == "none" and none["budget"] == 1.0 and none["relative"] == 1.0
    assert none["avg_tokens"] == 64.0 and rand["avg_tokens"] == 16.0
    assert rand["pruner"] == "random" and rand["budget"] == 0.25
    assert rand["relative"] == pytest.approx(rand["accuracy"] / none["accuracy"])
    assert set(none["per_type"]) == {"read", "exist", "count", "where"}


def test_shipped_model_quality_and_pruning_sensitivity(demo):
    none, rand = demo[1]["rows"]
    assert none["accuracy"] >= 0.90
    assert min(none["per_type"].values()) >= 0.75
    assert none["accuracy"] - rand["accuracy"] >= 0.15


def test_run_is_in_mlflow(demo):
    out, report = demo
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tprl-demo"], output_format="list")
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["none_100.accuracy"] == pytest.approx(report["rows"][0]["accuracy"])
    assert metrics["random_25.avg_tokens"] == 16.0
    assert (out / "mlruns").is_dir()


def test_adapter_score_agrees_with_the_evaluation(demo):
    """Greedy-correctness from one teacher-forced pass equals generate-and-compare accuracy."""
    import torch

    from tprl_ray.backbones.load import load_backbone
    from tprl_ray.data.layout import load_image, read_split
    from tprl_ray.evaluation.accuracy import evaluate
    from tprl_ray.pruners.random import RandomPruner

    out, _ = demo
    backbone = load_backbone("embedded")
    split = out / "data" / "test"
    samples = read_split(split)[:400]
    for pruner in (None, RandomPruner(0)):
        correct = []
        for start in range(0, len(samples), 100):
            chunk = samples[start:start + 100]
            feats = backbone.encode([load_image(split, s.image) for s in chunk]).llm_tokens
            keep = pruner.keep(feats, [s.question_id for s in chunk], [s.text for s in chunk], 0.25) if pruner else None
            correct.append(backbone.score([s.text for s in chunk], [s.answer for s in chunk], feats, keep)[1])
        assert torch.cat(correct).float().mean().item() == pytest.approx(
            evaluate(backbone, split, samples, pruner, 0.25)["accuracy"])
