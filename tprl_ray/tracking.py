"""MLflow tracking: a sqlite store under the run's output directory unless a URI is given."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import mlflow


def tracking_uri(out_dir: str | Path, uri: str | None = None) -> str:
    """``uri`` if given (or ``MLFLOW_TRACKING_URI``), else ``sqlite:///<out_dir>/mlflow.db``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path(out_dir).resolve() / 'mlflow.db')}"


@contextlib.contextmanager
def mlflow_run(out_dir: str | Path, experiment: str, run_name: str, uri: str | None = None,
               params: dict | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open an MLflow run; artifacts of a local store live in ``<out_dir>/mlruns``.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``; the user's value (or its
    absence) is restored afterwards, so a later run in this process picks its own store again.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri(out_dir, uri)
    mlflow.set_tracking_uri(uri)
    try:
        if mlflow.get_experiment_by_name(experiment) is None:
            location = (out_dir.resolve() / "mlruns").as_uri() if uri.startswith("sqlite:") else None
            mlflow.create_experiment(experiment, artifact_location=location)
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=run_name) as run:
            if params:
                mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            yield run
    finally:
        if user_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = user_uri
