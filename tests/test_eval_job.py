"""`tprl eval` end to end: a local Ray, a Ray Data actor pool, the shipped model, MLflow; the engine's
one encode per chunk for every setting."""

import json

import mlflow
import pytest
import ray

from tprl_ray.backbones.load import load_backbone
from tprl_ray.cli import main
from tprl_ray.data.layout import read_split
from tprl_ray.evaluation.config import EvalConfig
from tprl_ray.evaluation.engine import Predictor
from tprl_ray.evaluation.predict import evaluate
from tprl_ray.pruners.registry import build_pruner


@pytest.fixture(scope="module")
def local_ray():
    yield
    ray.shutdown()


def eval_args(digits_dir, out, pruners: str, budgets: str) -> list[str]:
    return [
        "eval",
        "--data",
        str(digits_dir / "test"),
        "--pruners",
        pruners,
        "--budgets",
        budgets,
        "--limit",
        "40",
        "--pool.batch-size",
        "16",
        "--out",
        str(out),
        "--ray-address",
        "local",
        "--pool.cpus",
        "0.5",
    ]


def test_eval_on_an_actor_pool_matches_in_process_evaluation(local_ray, digits_dir, tmp_path):
    out = tmp_path / "eval" / "vispruner.json"
    assert main(eval_args(digits_dir, out, "vispruner", "0.25")) == 0
    report = json.loads(out.read_text())
    none, pruned = report["rows"]
    samples = read_split(digits_dir / "test")[:40]
    backbone = load_backbone("embedded")
    unpruned = evaluate(backbone, digits_dir / "test", samples)
    expected = evaluate(backbone, digits_dir / "test", samples, build_pruner("vispruner"), 0.25)
    assert report["n"] == 40 and [r["label"] for r in report["rows"]] == ["none_100", "vispruner_25"]
    assert pruned["n"] == 40 and pruned["avg_tokens"] == 16.0 and none["avg_tokens"] == 64.0
    assert none["accuracy"] == pytest.approx(unpruned["accuracy"]) and none["relative"] == 1.0
    assert pruned["accuracy"] == pytest.approx(expected["accuracy"])
    assert pruned["relative"] == pytest.approx(expected["accuracy"] / unpruned["accuracy"])
    assert pruned["per_type"] == pytest.approx(expected["per_type"])
    assert pruned["flops"] < none["flops"] and pruned["kv_cache_mb"] < none["kv_cache_mb"]
    lines = [json.loads(x) for x in out.with_suffix(".predictions.jsonl").read_text().splitlines()]
    assert sorted({x["setting"] for x in lines}) == ["none_100", "vispruner_25"] and len(lines) == 80
    assert {x["question_id"] for x in lines} == {s.question_id for s in samples}
    client = mlflow.MlflowClient(f"sqlite:///{out.parent / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("tprl-eval").experiment_id])[0]
    assert run.data.metrics["vispruner_25.relative"] == pytest.approx(pruned["relative"])


def test_several_settings_in_one_call_equal_separate_calls(local_ray, digits_dir, tmp_path):
    """Three pruners x two budgets in one call give each setting the numbers of its own call."""
    together = tmp_path / "together.json"
    assert main(eval_args(digits_dir, together, "random,divprune,lfd", "0.25,0.125")) == 0
    rows = {r["label"]: r for r in json.loads(together.read_text())["rows"]}
    assert list(rows) == ["none_100", "random_25", "random_12", "divprune_25", "divprune_12", "lfd_25", "lfd_12"]
    for name in ("random", "divprune", "lfd"):
        alone = tmp_path / f"{name}.json"
        assert main(eval_args(digits_dir, alone, name, "0.25,0.125")) == 0
        for row in json.loads(alone.read_text())["rows"]:
            assert row == rows[row["label"]], row["label"]


def test_every_setting_of_a_chunk_is_answered_from_one_encode(digits_dir):
    cfg = EvalConfig(data=digits_dir / "test", pruners=["random", "vispruner", "lfd"], budgets=[0.25, 0.5])
    predictor = Predictor(json.loads(cfg.model_dump_json()))
    calls = []
    encode = predictor.backbone.encode
    predictor.backbone.encode = lambda images, **kw: calls.append(len(images)) or encode(images, **kw)
    ids = [s.question_id for s in read_split(digits_dir / "test")[:12]]
    out = predictor({"question_ids": [ids]})
    assert len(calls) == 1  # one vision pass for the chunk's images serves all seven settings
    assert len(out["setting"]) == 7 * 12 and set(out["setting"]) == {
        "none_100",
        "random_25",
        "random_50",
        "vispruner_25",
        "vispruner_50",
        "lfd_25",
        "lfd_50",
    }
    assert {v for s, v in zip(out["setting"], out["visual_tokens"]) if s.endswith("_25")} == {16.0}


def test_eval_refuses_unknown_pruner_benchmark_and_policy(capsys):
    assert main(["eval", "--pruners", "magicprune"]) == 2
    assert main(["eval", "--benchmark", "textvqa"]) == 2
    assert main(["eval", "--policies", "vispruner=runs/x"]) == 2
    assert main(["eval", "--pruners", "tprl"]) == 2
    assert main(["eval", "--pruners", "oracle", "--benchmark", "gqa"]) == 2
    err = capsys.readouterr().err
    assert "'tprl' needs the directory" in err and "'oracle' needs the digits benchmark" in err
    assert "unknown pruner 'magicprune'" in err and "unknown benchmark 'textvqa'" in err
    assert "unknown pruner 'vispruner' (available: lfd, tprl)" in err
