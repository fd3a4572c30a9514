"""The pipeline with the shipped policy (`policy: shipped`): report schema, the quality bar, pruning sensitivity,
MLflow. The full pipeline with every stage is submitted as a job in test_pipeline_job.py."""

import json

import mlflow
import pytest

from tprl_ray.pipeline.config import PipelineConfig
from tprl_ray.pipeline.run import run_pipeline


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import ray

    out = tmp_path_factory.mktemp("demo")
    try:
        return out, run_pipeline(PipelineConfig(out=out, budgets=[0.25], policy="shipped", ray_address="local"))
    finally:
        ray.shutdown()


def test_report_schema(demo):
    out, report = demo
    assert json.loads((out / "report.json").read_text()) == report
    assert report["benchmark"] == "digits"
    rows = {r["pruner"]: r for r in report["rows"]}
    assert list(rows) == [
        "none", "random", "vispruner", "divprune", "tome", "prumerge+", "visionzip", "cdpruner", "sparsevlm", "fastv",
        "lfd", "oracle",
    ]  # fmt: skip
    none, rand = rows["none"], rows["random"]
    assert none["budget"] == 1.0 and none["relative"] == 1.0 and none["avg_tokens"] == 64.0
    assert all(r["avg_tokens"] == 16.0 for n, r in rows.items() if n not in ("none", "fastv", "sparsevlm"))
    assert rows["fastv"]["avg_tokens"] == (2 * 64 + 2 * 16) / 4  # K = 2 of 4 layers see every token
    assert rows["sparsevlm"]["avg_tokens"] == (64 + 40 + 25 + 16) / 4  # stages after layers 0, 1, 2
    assert rand["budget"] == 0.25 and rand["relative"] == pytest.approx(rand["accuracy"] / none["accuracy"])
    assert set(none["per_type"]) == {"read", "exist", "count", "where"}
    assert rand["flops"] < rows["fastv"]["flops"] < none["flops"]
    assert rand["kv_cache_mb"] < rows["fastv"]["kv_cache_mb"] < none["kv_cache_mb"]
    from PIL import Image

    width, height = Image.open(out / "pareto.png").size  # two panels: against tokens and against FLOPs
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and width > 1.6 * height


def test_shipped_model_quality_and_pruning_sensitivity(demo):
    rows = {r["pruner"]: r for r in demo[1]["rows"]}
    none, rand = rows["none"], rows["random"]
    assert none["accuracy"] >= 0.90
    assert min(none["per_type"].values()) >= 0.75
    assert none["accuracy"] - rand["accuracy"] >= 0.15
    # informed pruning beats random at the same budget
    assert (
        rows["vispruner"]["accuracy"] > rand["accuracy"] + 0.05
        and rows["divprune"]["accuracy"] > rand["accuracy"] + 0.05
    )
    # the shipped LfD policy imitates VisPruner: within 2 points of it at 25% of the tokens
    assert rows["lfd"]["accuracy"] >= rows["vispruner"]["accuracy"] - 0.02
    # the question-aware reference keeps the asked cells: above every method that prunes the input
    inputs = [r for n, r in rows.items() if n != "oracle" and r["avg_tokens"] == 16]
    assert all(rows["oracle"]["accuracy"] > r["accuracy"] for r in inputs)


def test_report_command_table_plot_and_mlflow(demo, tmp_path, capsys):
    from tprl_ray.cli import main

    out, report = demo
    assert main(["report", "--set", f"inputs=[{out / 'report.json'}]", "--out", str(tmp_path / "r.md")]) == 0
    table = (tmp_path / "r.md").read_text()
    assert all(name in table for name in ("vispruner", "divprune", "tome", "fastv", "kv_cache_mb"))
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG" and "vispruner" in capsys.readouterr().out
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("tprl-report").experiment_id])[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"r.md", "r.png"}


def test_run_is_in_mlflow(demo):
    out, report = demo
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("tprl").experiment_id])}
    assert set(runs) == {"pipeline", "evaluation", "trajectories"}
    assert runs["evaluation"].data.tags["mlflow.parentRunId"] == runs["pipeline"].info.run_id
    assert runs["trajectories"].data.tags["mlflow.parentRunId"] == runs["pipeline"].info.run_id
    logged = {a.path for a in client.list_artifacts(runs["trajectories"].info.run_id, "trajectories")}
    figures = sorted((out / "trajectories").glob("*.png"))
    assert len(figures) == 8 and logged == {f"trajectories/{f.name}" for f in figures} | {
        "trajectories/trajectories.json"
    }
    assert runs["pipeline"].data.params["policy"] == "shipped"
    metrics = runs["evaluation"].data.metrics
    assert metrics["none_100.accuracy"] == pytest.approx(report["rows"][0]["accuracy"])
    assert metrics["random_25.avg_tokens"] == 16.0
    assert (out / "mlruns").is_dir()


def test_adapter_score_agrees_with_the_evaluation(demo):
    """Greedy-correctness from one teacher-forced pass equals generate-and-compare accuracy."""
    import torch

    from tprl_ray.backbones.load import load_backbone
    from tprl_ray.data.layout import load_image, read_split
    from tprl_ray.evaluation.predict import evaluate
    from tprl_ray.pruners.base import PruneBatch
    from tprl_ray.pruners.random import RandomPruner

    out, _ = demo
    backbone = load_backbone("embedded")
    split = out / "data" / "test"
    samples = read_split(split)[:400]
    for pruner in (None, RandomPruner(0)):
        correct = []
        for start in range(0, len(samples), 100):
            chunk = samples[start : start + 100]
            feats = backbone.encode([load_image(split, s.image) for s in chunk]).llm_tokens
            batch = PruneBatch(
                list(feats),
                list(feats),
                None,
                [(8, 8)] * len(chunk),
                [s.question_id for s in chunk],
                [s.text for s in chunk],
            )
            keep = pruner.prune(batch, 0.25).keep if pruner else None
            correct.append(backbone.score([s.text for s in chunk], [s.answer for s in chunk], feats, keep)[1])
        assert torch.cat(correct).float().mean().item() == pytest.approx(
            evaluate(backbone, split, samples, pruner, 0.25)["accuracy"]
        )
