"""Shared fixtures: a small digits benchmark and its precompute built once per session, Ray heads of the
tests' own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tprl_ray.data.digits import DigitsConfig, build_digits

EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without interpreter finalization once the session has reported, when Ray ran here.

    The suite starts and stops Ray many times in this one process. Threads left behind by Ray's core
    worker can crash the interpreter's teardown after every test has passed (ray-project/ray#31145;
    seen once here as a segfault after "163 passed"). The session's own exit status is kept."""
    if "ray" in sys.modules and EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[EXIT_STATUS])


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """A small benchmark (seed 0: the same digit split as the shipped model)."""
    out = tmp_path_factory.mktemp("digits")
    build_digits(DigitsConfig(out=out, seed=0, split_sizes={"train": 40, "val": 10, "test": 30}))
    return out


MIXTURE_SUBSETS = {"readexist": ("read", "exist"), "countwhere": ("count", "where")}


def split_subset(split: Path, out: Path, categories: tuple[str, ...]) -> Path:
    """The questions of ``split`` in ``categories``, as a split of their own (images copied)."""
    import json
    import shutil

    out.mkdir(parents=True)
    shutil.copytree(split / "images", out / "images")
    questions = [json.loads(line) for line in (split / "questions.jsonl").read_text().splitlines()]
    keep = {q["question_id"] for q in questions if q["category"] in categories}
    for name in ("questions.jsonl", "answers.jsonl"):
        rows = [line for line in (split / name).read_text().splitlines() if json.loads(line)["question_id"] in keep]
        (out / name).write_text("\n".join(rows) + "\n")
    return out


@pytest.fixture(scope="session")
def mixture_parts(digits_dir, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """The digits questions as two datasets by question type (read+exist, count+where): train, val and
    test of each."""
    root = tmp_path_factory.mktemp("mixture")
    return {
        name: {split: split_subset(digits_dir / split, root / name / split, cats) for split in ("train", "val", "test")}
        for name, cats in MIXTURE_SUBSETS.items()
    }


@pytest.fixture(scope="session")
def precomputed(digits_dir, tmp_path_factory):
    """The digits train and val splits precomputed with the shipped model (in-process, no Ray)."""
    from tprl_ray.precompute.config import PrecomputeConfig
    from tprl_ray.precompute.job import run_precompute

    out = tmp_path_factory.mktemp("pc")
    for split in ("train", "val"):
        run_precompute(
            PrecomputeConfig(data=digits_dir / split, out=out / split, shard_size=64), progress=False, engine="local"
        )
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAY_ENV = {"RAY_AUTH_MODE": "disabled"}  # a private test head; the CLI would otherwise need the token


@contextlib.contextmanager
def ray_head(
    temp_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
    metrics_port: int | None = None,
) -> Iterator[str]:
    """A Ray head with its own ports and temp dir, in its own process group, every process listening on 127.0.0.1
    only; yields its GCS address. Stopped by SIGTERM to `ray start`, then SIGKILL to that group (never `ray stop`,
    which stops every Ray on the host)."""
    from tprl_ray.ray_setup import loopback  # imported here: collecting the tests imports no Ray

    port = port or free_port()
    own = [f"--metrics-export-port={metrics_port or free_port()}"] + [
        f"--{name}={free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
            "node-manager-port",
            "object-manager-port",
        )
    ]
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        *own,
        *args,
    ]
    # The dashboard's and the autoscaler's metrics servers: fixed ports unless set (44227, 44217), maybe held.
    metrics = {name: str(free_port()) for name in ("DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT")}
    # Ray's single-node switch, for the head (its environment) and for this process while the head runs: else a
    # driver here, or a `ray job submit` run from here, turns 127.0.0.1 into the host's external address.
    with loopback():
        head = subprocess.Popen(
            cmd,
            env={**os.environ, **RAY_ENV, **metrics, **(env or {})},
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            yield f"127.0.0.1:{port}"
        finally:
            # SIGTERM to `ray start` alone: it drains the node through its GCS (1 s), then stops its processes.
            # SIGTERM to the whole group stops the GCS first, and the drain waits 30 s for it.
            head.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                head.wait(60)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)  # whatever is left of the group


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a run started with ``start_new_session`` and every process it started (a Ray of its own: GCS,
    raylet, workers and actors), and wait until all are gone, so that none still writes after it returns."""
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:  # processes that left the group
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()
    psutil.wait_procs(tree, timeout=60)


SMALL_PIPELINE = {
    "budgets": [0.25],
    "pruners": ["vispruner", "lfd", "tprl"],
    "train_questions": 96,
    "eval_questions": 64,
    "autoencoder": {"epochs": 1},
    "lfd": {"epochs": 1},
    "ppo": {"iterations": 1},
    "trajectories": 2,
}


@pytest.fixture(scope="session")
def small_pipeline() -> dict:
    """Every stage of the pipeline on a few questions, one epoch and one PPO iteration each."""
    return dict(SMALL_PIPELINE)


@pytest.fixture(scope="session")
def pipeline_job(tmp_path_factory):
    """`ray job submit` of `pipelines/full.py` (every stage, a few questions) to a head of our own;
    yields the job's output directory and its logs."""
    import tempfile

    import yaml

    out = tmp_path_factory.mktemp("pipeline-job")
    config = out / "full.yaml"
    # and the language model fine-tuned on pruned inputs, evaluated beside the frozen one
    fine_tune = {"finetune": True, "llm": {"epochs": 1}}
    config.write_text(yaml.safe_dump({**SMALL_PIPELINE, **fine_tune, "out": str(out / "run")}))
    dashboard = free_port()
    repo = Path(__file__).resolve().parent.parent
    with ray_head(
        Path(tempfile.mkdtemp(prefix="ray", dir="/tmp")),
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
    ):
        submit = [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            f"--address=http://127.0.0.1:{dashboard}",
            "--working-dir",
            str(repo),
            "--",
            sys.executable,
            "pipelines/full.py",
            "--config",
            str(config),
        ]
        for _ in range(60):  # the job server and its agent answer some seconds after the head
            proc = subprocess.run(submit, env={**os.environ, **RAY_ENV}, capture_output=True, text=True, timeout=1200)
            if not any(m in proc.stdout + proc.stderr for m in ("Failed to connect", "No available agent")):
                break
            time.sleep(2)
    return out / "run", proc
