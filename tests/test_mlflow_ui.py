"""The pipeline job's runs and registered pruner, found in the MLflow UI by headless Chromium."""

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from conftest import free_port

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def mlflow_ui(pipeline_job, tmp_path_factory):
    """`mlflow server` on 127.0.0.1 over the pipeline's store, as the README's `make mlflow` starts it."""
    out, _ = pipeline_job
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{out / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        cwd=tmp_path_factory.mktemp("mlflow-server"),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).read() == b"OK":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer /health within 60 s")
        yield url, out, tmp_path_factory.mktemp("chromium")
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)


def page_text(url: str, profile: Path) -> str:
    """The visible text of ``url`` after its scripts ran, as headless Chromium renders it."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed (`apt-get install chromium`; .ci/run installs it)"
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    text = re.sub(r"<style.*?</style>|<script.*?</script>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


def test_ui_lists_the_pipeline_run_and_its_stage_runs(mlflow_ui):
    url, out, profile = mlflow_ui
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tprl").experiment_id
    runs = page_text(f"{url}/#/experiments/{experiment}/runs", profile)
    assert "pipeline" in runs and "8 matching runs" in runs  # children fold under their parent
    for run in client.search_runs([experiment], "tags.mlflow.parentRunId != ''"):
        page = page_text(f"{url}/#/experiments/{experiment}/runs/{run.info.run_id}", profile)
        assert f" {run.info.run_name} " in page and "Parent run pipeline" in page, run.info.run_name


def test_ui_shows_the_registered_pruner_with_its_selection_rule(mlflow_ui):
    url, out, profile = mlflow_ui
    model = page_text(f"{url}/#/models/tprl-pruner", profile)
    assert "Registered Models tprl-pruner" in model and "Version 1" in model
    version = page_text(f"{url}/#/models/tprl-pruner/versions/1", profile)
    assert "Source Run : ppo" in version and "selection" in version and "top-k" in version
    assert "Keeps the top round(b * N) tokens by keep logit" in version
