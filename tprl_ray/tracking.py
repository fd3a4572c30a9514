"""MLflow tracking: a sqlite store under the run's output directory unless a URI is given.

A pipeline run (:func:`pipeline_run`) is a parent run; every stage started inside it logs a child
run into the pipeline's experiment, whatever experiment the stage would use on its own. The trained
pruner is registered as a model version with its selection rule (:func:`register_pruner`).

Each run's id is recorded in its output directory (``.mlflow-run-<run name>``). A process killed
mid-run leaves its run ``RUNNING``: the next run of that name into that directory marks it ``KILLED``.
A run that continues an unfinished one (killed or ``FAILED``) is tagged ``tprl.resumed_from`` with its id.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

PARENT_RUN = "TPRL_MLFLOW_PARENT_RUN"
RESUMED_FROM = "tprl.resumed_from"
RESUMED_BY = "tprl.resumed_by"


def tracking_uri(out_dir: str | Path, uri: str | None = None) -> str:
    """``uri`` if given (or ``MLFLOW_TRACKING_URI``), else ``sqlite:///<out_dir>/mlflow.db``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path(out_dir).resolve() / 'mlflow.db')}"


def _start(out_dir: Path, experiment: str, run_name: str, uri: str):
    import mlflow

    parent = os.environ.get(PARENT_RUN)
    if parent:
        experiment_id = mlflow.get_run(parent).info.experiment_id
        return mlflow.start_run(run_name=run_name, experiment_id=experiment_id, parent_run_id=parent, nested=True)
    existing = mlflow.get_experiment_by_name(experiment)
    if existing is not None:
        return mlflow.start_run(run_name=run_name, experiment_id=existing.experiment_id)
    location = (out_dir.resolve() / "mlruns").as_uri() if uri.startswith("sqlite:") else None
    return mlflow.start_run(
        run_name=run_name, experiment_id=mlflow.create_experiment(experiment, artifact_location=location)
    )


def run_file(out_dir: Path, run_name: str) -> Path:
    """Where the id of the latest run ``run_name`` into ``out_dir`` is recorded."""
    return out_dir / f".mlflow-run-{re.sub(r'[^A-Za-z0-9_.-]', '_', run_name)}"


def unfinished_run(path: Path) -> str | None:
    """The run recorded in ``path`` if it did not finish (a ``RUNNING`` one is dead: marked ``KILLED``)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not path.is_file():
        return None
    run_id, client = path.read_text().strip(), MlflowClient()
    try:
        info = client.get_run(run_id).info
        if info.lifecycle_stage == "deleted":  # deleted in the UI: nothing to close or link
            return None
        if info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
    except MlflowException:  # not in this store (any more)
        return None
    return None if info.status == "FINISHED" else run_id


def record_run(path: Path, run_id: str, previous: str | None) -> None:
    """Record ``run_id`` in ``path`` (atomically) and link it with the unfinished run it continues."""
    import mlflow

    tmp = path.with_name(f".{path.name}.tprl-{os.getpid()}.tmp")  # tracking may not import artifacts (layers)
    tmp.write_text(run_id)
    os.replace(tmp, path)
    if previous:
        mlflow.set_tags(
            {RESUMED_FROM: previous, "mlflow.note.content": f"Continues run {previous}, which did not finish."}
        )
        mlflow.MlflowClient().set_tag(previous, RESUMED_BY, run_id)


@contextlib.contextmanager
def mlflow_run(
    out_dir: str | Path, experiment: str, run_name: str, uri: str | None = None, params: dict | None = None
) -> Iterator:
    """Open an MLflow run (a child run inside :func:`pipeline_run`); artifacts of a local store live
    in ``<out_dir>/mlruns``. An unfinished earlier run of ``run_name`` into ``out_dir`` is closed and linked.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``; the user's value (or its
    absence) is restored afterwards, so a later run in this process picks its own store again.
    """
    import mlflow

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri(out_dir, uri)
    mlflow.set_tracking_uri(uri)
    recorded = run_file(out_dir, run_name)
    try:
        previous = unfinished_run(recorded)
        with _start(out_dir, experiment, run_name, uri) as run:
            record_run(recorded, run.info.run_id, previous)
            if params:
                mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            yield run
    finally:
        if user_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = user_uri


@contextlib.contextmanager
def pipeline_run(
    out_dir: str | Path, experiment: str, run_name: str, uri: str | None = None, params: dict | None = None
) -> Iterator:
    """The parent run of a pipeline: stages run inside it log child runs into ``experiment``. Inside
    another parent run it is a child run of that one, and the parent of the stages run inside it."""
    outer = os.environ.get(PARENT_RUN)
    with mlflow_run(out_dir, experiment, run_name, uri, params) as run:
        os.environ[PARENT_RUN] = run.info.run_id
        try:
            yield run
        finally:
            if outer is None:
                os.environ.pop(PARENT_RUN, None)
            else:
                os.environ[PARENT_RUN] = outer


def register_model(name: str, source: str, description: str, tags: dict[str, str], about: str, model_id=None):
    """Register ``source`` (``runs:/<active run>/<artifact>`` or a logged model's URI) as a new version of
    the model ``name`` (``description``, ``tags``); a new model is created with the description ``about``."""
    import mlflow

    run = mlflow.active_run()
    client = mlflow.MlflowClient()
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description=about)
    return client.create_model_version(
        name, source, run_id=run.info.run_id, tags=tags, description=description, model_id=model_id
    )


def register_pruner(name: str, model, taus: dict[str, float]):
    """The pruner logged as the active run's pyfunc model (its ``ModelInfo``, ``model``) registered as a new
    version of the model ``name``: tagged ``tau:<budget>`` and described by the tau-per-budget table for a
    thresholded policy (``taus``), else tagged ``selection: top-k``."""
    if taus:
        tags = {f"tau:{b}": f"{t:.6g}" for b, t in taus.items()}
        description = "| budget | tau |\n|---|---|\n" + "\n".join(f"| {b} | {t:.6g} |" for b, t in taus.items())
    else:
        tags = {"selection": "top-k"}
        description = "Keeps the top round(b * N) tokens by keep logit, for any kept fraction b."
    about = (
        "TPRL visual-token pruner: one policy pass over the tokens. mlflow.pyfunc.load_model(uri).predict("
        "{'features': [B, N, d_v], 'query': [B, d_q]}) gives [B, N] keep probabilities."
    )
    return register_model(name, model.model_uri, description, tags, about, model.model_id)
