"""`tprl eval` end to end: a local Ray, a Ray Data actor pool, the shipped model, MLflow."""

import json

import mlflow
import pytest
import ray

from tprl_ray.backbones.load import load_backbone
from tprl_ray.cli import main
from tprl_ray.data.layout import read_split
from tprl_ray.evaluation.accuracy import evaluate
from tprl_ray.pruners.registry import build_pruner


@pytest.fixture(scope="module")
def local_ray():
    yield
    ray.shutdown()


def test_eval_on_an_actor_pool_matches_in_process_evaluation(local_ray, digits_dir, tmp_path):
    out = tmp_path / "eval" / "vispruner.json"
    code = main(["eval", "--data", str(digits_dir / "test"), "--pruner", "vispruner", "--budget", "0.25",
                 "--limit", "40", "--batch-size", "16", "--out", str(out), "--ray-address", "local",
                 "--cpus-per-actor", "0.5"])
    assert code == 0
    result = json.loads(out.read_text())
    samples = read_split(digits_dir / "test")[:40]
    backbone = load_backbone("embedded")
    unpruned = evaluate(backbone, digits_dir / "test", samples)
    pruned = evaluate(backbone, digits_dir / "test", samples, build_pruner("vispruner"), 0.25)
    assert result["n"] == 40 and result["avg_tokens"] == 16.0 and result["unpruned"]["avg_tokens"] == 64.0
    assert result["unpruned"]["score"] == pytest.approx(unpruned["accuracy"])
    assert result["score"] == pytest.approx(pruned["accuracy"])
    assert result["relative"] == pytest.approx(pruned["accuracy"] / unpruned["accuracy"])
    assert result["per_category"] == pytest.approx(pruned["per_type"])
    lines = [json.loads(x) for x in out.with_suffix(".predictions.jsonl").read_text().splitlines()]
    assert sorted({x["setting"] for x in lines}) == ["none", "vispruner"] and len(lines) == 80
    assert {x["question_id"] for x in lines} == {s.question_id for s in samples}
    client = mlflow.MlflowClient(f"sqlite:///{out.parent / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("tprl-eval").experiment_id])[0]
    assert run.data.metrics["relative"] == pytest.approx(result["relative"])


def test_eval_refuses_unknown_pruner_and_benchmark(capsys):
    assert main(["eval", "--pruner", "sparsevlm"]) == 2
    assert main(["eval", "--benchmark", "textvqa"]) == 2
    err = capsys.readouterr().err
    assert "unknown pruner 'sparsevlm'" in err and "unknown benchmark 'textvqa'" in err
