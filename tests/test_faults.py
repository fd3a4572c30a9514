"""Faults: killed processes and actors (a stage's driver, an env runner, an evaluation actor), the
dead MLflow runs and the temporary leftovers they leave."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import kill_tree
from mlflow import MlflowClient
from test_ppo import ppo_inputs, small_run  # noqa: F401 (a fixture)

from tprl_ray.tracking import RESUMED_BY, RESUMED_FROM


def actors(class_part: str) -> list[dict]:
    """The live actors of this driver's Ray whose class name contains ``class_part`` (read from the GCS:
    the state API needs a dashboard and is confused by the other Ray instances of a shared machine)."""
    import ray._private.state

    return [
        a for a in ray._private.state.actors().values() if a["State"] == "ALIVE" and class_part in a["ActorClassName"]
    ]


def restarts(actor_id: str) -> int:
    import ray._private.state

    return ray._private.state.actors(actor_id)["NumRestarts"]


def killed_when(started: Path, code: str, *args: str, timeout: float = 300) -> None:
    """Run ``python -c code *args`` in its own process group, SIGKILL the group once ``started`` exists."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + timeout
        while not started.exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before it was killed"
            time.sleep(0.1)
    finally:
        kill_tree(proc)


def runs(out: Path, experiment: str) -> list:
    """The runs of ``experiment`` in the sqlite store under ``out``, oldest first."""
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return sorted(found, key=lambda r: r.info.start_time)


NESTED = """
import sys, time
from pathlib import Path
from tprl_ray.tracking import mlflow_run, pipeline_run
out = Path(sys.argv[1])
with pipeline_run(out, "tprl-test", "pipeline"), mlflow_run(out / "stage", "tprl-stage", "stage"):
    if sys.argv[2] == "kill":
        (out / "started").touch()
        time.sleep(600)
    elif sys.argv[2] == "fail":
        raise RuntimeError("a failing stage")
"""


def test_dead_pipeline_and_stage_runs_are_closed_and_linked(tmp_path):
    def nested(how: str) -> tuple[list, list]:  # the pipeline runs and the stage runs so far
        if how != "kill":
            subprocess.run([sys.executable, "-c", NESTED, str(tmp_path), how], capture_output=True, check=how == "ok")
        found = runs(tmp_path, "tprl-test")
        return [r for r in found if "mlflow.parentRunId" not in r.data.tags], [
            r for r in found if "mlflow.parentRunId" in r.data.tags
        ]

    killed_when(tmp_path / "started", NESTED, str(tmp_path), "kill")
    [dead_parent], [dead_child] = nested("kill")
    assert dead_parent.info.status == dead_child.info.status == "RUNNING"  # what a kill leaves
    (old_parent, parent), (old_child, child) = nested("ok")
    assert old_parent.info.status == old_child.info.status == "KILLED"
    assert parent.info.status == child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.tags[RESUMED_FROM] == old_parent.info.run_id
    assert child.data.tags[RESUMED_FROM] == old_child.info.run_id
    assert old_child.data.tags[RESUMED_BY] == child.info.run_id
    nested("fail")  # a failed run is continued too (and stays FAILED); a finished one is not
    _, (*_, failed, last) = nested("ok")
    assert RESUMED_FROM not in failed.data.tags and failed.info.status == "FAILED"
    assert last.data.tags[RESUMED_FROM] == failed.info.run_id and last.info.status == "FINISHED"


def test_a_killed_ppo_run_resumes_in_a_linked_run_without_its_leftovers(ppo_inputs, tmp_path):  # noqa: F811
    from tprl_ray.rl.train import latest_checkpoint, train_ppo

    cfg = small_run(ppo_inputs, tmp_path / "ppo", 1)
    code = "import sys; from tprl_ray.rl.config import PpoConfig as C; from tprl_ray.rl.train import train_ppo as t; "
    code += "t(C.model_validate_json(sys.argv[1]))"
    longer = cfg.model_copy(update={"iterations": 50}).model_dump_json()
    killed_when(cfg.out / "checkpoints" / "iter-00001", code, longer)
    (dead,) = runs(cfg.out, "tprl-ppo")
    assert dead.info.status == "RUNNING"
    (cfg.out / "checkpoints" / ".tmp-123").mkdir()  # a save_checkpoint cut short
    half_written = cfg.out / ".policy.json.tprl-abc123.tmp"  # an atomic write cut short
    half_written.write_text("{")
    done = int(latest_checkpoint(cfg.out).name.removeprefix("iter-"))
    assert train_ppo(cfg.model_copy(update={"iterations": done + 1}))["iterations"] == done + 1
    assert not list((cfg.out / "checkpoints").glob(".tmp-*")) and not half_written.exists()
    old, new = runs(cfg.out, "tprl-ppo")
    assert old.info.status == "KILLED" and new.info.status == "FINISHED"
    assert new.data.tags[RESUMED_FROM] == old.info.run_id and old.data.tags[RESUMED_BY] == new.info.run_id
    assert (cfg.out / ".mlflow-run-ppo").read_text() == new.info.run_id


def test_ppo_survives_a_killed_env_runner(ppo_inputs, tmp_path):  # noqa: F811
    from tprl_ray.rl.train import train_ppo

    killed = []

    def kill():
        runner = actors("EnvRunner")[0]
        os.kill(runner["Pid"], signal.SIGKILL)
        killed.append(runner["ActorID"])

    def kill_soon(iteration, metrics):
        if iteration == 1:
            threading.Timer(0.5, kill).start()  # during iteration 2's sampling

    cfg = small_run(ppo_inputs, tmp_path / "ppo", 3)
    result = train_ppo(cfg, on_iteration=kill_soon)
    assert killed and restarts(killed[0]) >= 1 and result["iterations"] == 3
    history = json.loads((cfg.out / "checkpoints" / "iter-00003" / "progress.json").read_text())["history"]
    assert len(history) == 3
    assert history[0]["env_steps"] < history[1]["env_steps"] < history[2]["env_steps"]  # each sampled anew
    for metrics in history:
        for key in ("policy_loss", "vf_loss", "entropy"):
            assert math.isfinite(metrics[key])
    (run,) = runs(cfg.out, "tprl-ppo")
    client = MlflowClient(f"sqlite:///{cfg.out / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "policy_loss")] == [1, 2, 3]


def test_evaluation_survives_a_killed_actor(digits_dir, tmp_path):
    from tprl_ray.data.layout import read_split
    from tprl_ray.evaluation.config import EvalConfig
    from tprl_ray.evaluation.engine import run_eval
    from tprl_ray.ray_setup import init_ray

    cfg = EvalConfig(
        data=digits_dir / "test",
        pruners=["random"],
        budgets=[0.25],
        out=tmp_path / "report.json",
        pool={"size": 1, "cpus": 0.5, "batch_size": 2},
        ray_address="local",
    )
    killed, done = [], threading.Event()

    def kill_once_answering():  # right after the actor starts: 60 chunks of 2 questions are queued on it
        while not done.is_set() and not (workers := actors("MapWorker")):
            time.sleep(0.05)
        if workers and not done.wait(0.2):
            os.kill(workers[0]["Pid"], signal.SIGKILL)
            killed.append(workers[0]["ActorID"])

    init_ray(cfg.ray_address)  # before the watcher looks for the actor
    watcher = threading.Thread(target=kill_once_answering)
    watcher.start()
    try:
        report = run_eval(cfg)
    finally:
        done.set()
        watcher.join()
    questions = [s.question_id for s in read_split(cfg.data)]
    assert killed and restarts(killed[0]) >= 1  # killed while in use, not after the pool was done
    assert report["n"] == len(questions)
    rows = [json.loads(line) for line in cfg.out.with_suffix(".predictions.jsonl").read_text().splitlines()]
    pairs = [(r["setting"], r["question_id"]) for r in rows]
    assert len(pairs) == len(set(pairs)) == 2 * len(questions)
    assert {q for _, q in pairs} == set(questions)


def test_a_ray_train_stage_resumes_past_what_a_killed_run_left(precomputed, tmp_path):
    from tprl_ray.training.autoencoder import train_autoencoder
    from tprl_ray.training.config import AutoencoderConfig

    cfg = AutoencoderConfig(
        data=precomputed / "train",
        val_data=precomputed / "val",
        out=tmp_path / "ae",
        latent=16,
        epochs=1,
        workers=1,
        cpus_per_worker=0.5,
        batch_size=16,
        ray_address="local",
    )
    train_autoencoder(cfg)
    run_dir = cfg.out / "ray_train" / "autoencoder"
    (listed,) = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    cut = run_dir / "checkpoint_2099-01-01_00-00-00.000000"  # a copy cut short: the newest, not in the snapshot
    cut.mkdir()
    (cut / "state.pt").write_bytes((listed / "state.pt").read_bytes()[:100])
    half_written = cfg.out / ".autoencoder.json.tprl-abc123.tmp"
    half_written.write_text("{")
    assert train_autoencoder(cfg.model_copy(update={"epochs": 2}))["epochs"] == 2
    assert not cut.exists() and not half_written.exists()


def test_a_ppo_checkpoint_saved_before_a_setting_existed_still_resumes(tmp_path):
    import pytest

    from tprl_ray.rl.config import PpoConfig
    from tprl_ray.rl.train import resumable_history, settings

    cfg = PpoConfig(data=tmp_path / "codes", init=tmp_path / "lfd", out=tmp_path / "ppo")
    stored = settings(cfg)
    del stored["scorer"]["backbone"]["max_question_tokens"]  # added after the run was saved
    stored["scorer"]["retries"] = 5  # removed after the run was saved
    checkpoint = cfg.out / "checkpoints" / "iter-00001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "progress.json").write_text(json.dumps({"history": [{"episode_return": 1.0}], "settings": stored}))
    assert resumable_history(cfg) == [{"episode_return": 1.0}]
    stored["scorer"]["backbone"]["dtype"] = "float16"  # a setting that did change is still refused
    (checkpoint / "progress.json").write_text(json.dumps({"history": [], "settings": stored}))
    with pytest.raises(ValueError, match="with other scorer"):
        resumable_history(cfg)


def test_a_dead_run_deleted_in_the_ui_is_neither_closed_nor_linked(tmp_path):
    from tprl_ray.tracking import mlflow_run

    with mlflow_run(tmp_path, "tprl-test", "stage") as first:
        pass
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.update_run(first.info.run_id, status="RUNNING")  # what a kill leaves
    client.delete_run(first.info.run_id)
    with mlflow_run(tmp_path, "tprl-test", "stage") as second:
        pass
    assert RESUMED_FROM not in client.get_run(second.info.run_id).data.tags
    assert (tmp_path / ".mlflow-run-stage").read_text() == second.info.run_id
