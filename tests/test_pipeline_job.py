"""`ray job submit -- python pipelines/full.py --config ...` on a local head: outputs, MLflow runs, the
registered pruner."""

import json

import mlflow
import numpy as np
import torch

from tprl_ray.pruners.lfd import TprlPruner
from tprl_ray.pruners.pyfunc import pruner_directory


def test_submitted_pipeline_succeeds_and_writes_every_stage(pipeline_job):
    out, proc = pipeline_job
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    rows = {r["pruner"]: r for r in report["rows"]}
    assert list(rows) == ["none", "vispruner", "lfd", "tprl", "none+ft", "tprl+ft"]
    assert rows["tprl"]["avg_tokens"] == 16.0  # trained in the budget regime: the top 16 of 64 tokens
    # the fine-tuned model's rows are relative to the frozen model's unpruned accuracy
    assert rows["tprl+ft"]["relative"] == rows["tprl+ft"]["accuracy"] / rows["none"]["accuracy"]
    tuned = json.loads((out / "finetuned" / "report.json").read_text())
    assert tuned["rows"][1]["accuracy"] == rows["tprl+ft"]["accuracy"] and rows["tprl+ft"]["avg_tokens"] == 16.0
    for path in (
        "precompute/train/manifest.json",
        "precompute/val/manifest.json",
        "autoencoder/autoencoder.safetensors",
        "lfd/policy.safetensors",
        "ppo/policy.safetensors",
        "llm/adapter/adapter_model.safetensors",
        "pareto.png",
    ):
        assert (out / path).is_file(), path
    assert json.loads((out / "ppo" / "policy.json").read_text())["init"] == str(out / "lfd")
    trajectories = json.loads((out / "trajectories" / "trajectories.json").read_text())
    assert [len(step["kept"]) for step in trajectories[0]["steps"]] == [64, 16]  # the PPO policy at 25%
    assert len(list((out / "trajectories").glob("*.png"))) == 2


def test_stages_are_child_runs_and_the_pruner_is_registered(pipeline_job, monkeypatch):
    out, _ = pipeline_job
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")  # restored after the test
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("tprl")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "pipeline")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    stages = {"autoencoder", "lfd", "ppo", "evaluation", "llm", "evaluation-finetuned", "trajectories"}
    assert set(children) == stages and len(runs) == 8
    assert client.get_model_version("tprl-llm", "1").run_id == children["llm"].info.run_id
    assert all(r.info.status == "FINISHED" for r in runs)
    assert children["ppo"].data.params["train_batch_size"] == "768"
    report = json.loads((out / "report.json").read_text())
    tprl = next(r for r in report["rows"] if r["pruner"] == "tprl")
    assert children["evaluation"].data.metrics["tprl_25.accuracy"] == tprl["accuracy"]
    version = client.get_model_version("tprl-pruner", "1")
    card = json.loads((out / "ppo" / "policy.json").read_text())
    assert version.run_id == children["ppo"].info.run_id
    assert card["regime"] == "budget" and "tau" not in card and version.tags == {"selection": "top-k"}
    # the registered pruner is a pyfunc model: features and a query embedding in, keep probabilities out
    model = mlflow.pyfunc.load_model("models:/tprl-pruner/1")
    shipped = pruner_directory("models:/tprl-pruner/1")
    assert {f.name for f in shipped.iterdir()} == {
        f"{n}.{e}" for n in ("policy", "autoencoder") for e in ("safetensors", "json")
    }
    pruner = TprlPruner(out / "ppo")
    features, query = torch.randn(2, 64, pruner.encoder.dims["d_v"]), torch.randn(2, pruner.policy.dims["d_query"])
    probabilities = model.predict({"features": features.numpy(), "query": query.numpy()})
    assert probabilities.shape == (2, 64)
    assert np.allclose(probabilities[1], torch.sigmoid(pruner.keep_logits(features[1], query[1], (8, 8))).numpy())
