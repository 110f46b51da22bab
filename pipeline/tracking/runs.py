"""MLflow look-ups shared by the stage tools, the study runner and the benches.

* :func:`resolve_uri`: ``--tracking-uri`` or ``$MLFLOW_TRACKING_URI`` or the engine's default
  SQLite store ``<runs_root>/mlflow.db`` (schema created safely).
* :func:`client`, :func:`get_run`: an ``MlflowClient`` and a run; a run the store does not have is a
  :class:`RunLookupError` with a one-line message (the CLIs print it and exit 2).
* :func:`run_file`: a file of a finished run, from its run folder (tag ``tracking.run_dir``,
  written by the engine's Tracker) when it is reachable, else downloaded from its artifacts.
* :func:`recorded_run_id`, :func:`run_id_from_dir`: the run id a training run folder names.
* :func:`study_runs`: every run tagged ``study=<id>`` (optionally one ``stage``) in any experiment.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.tracking import credentials, store
from pipeline.tracking.constants import RUN_ID_FILE


class RunLookupError(Exception):
    """A run (or the run id of a run folder) the tracking store does not have; one line to show the user."""


def resolve_uri(uri: str | None, runs_root: str | os.PathLike) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else the default SQLite store under ``runs_root`` (a folder the
    caller has resolved: relative runs roots are relative to the repository root, which the tracking room
    does not know; :func:`pipeline.train.config.resolve_path`)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        credentials.check_uri(uri, "--tracking-uri / $MLFLOW_TRACKING_URI")
        if uri.startswith("sqlite:///"):
            store.ensure_sqlite_store(uri)
        return uri
    return store.default_tracking_uri(runs_root)


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def get_run(mlflow_client, run_id: str):
    try:
        return mlflow_client.get_run(run_id)
    except Exception as err:  # noqa: BLE001 (MlflowException, connection errors)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunLookupError(f"run {run_id!r} not found in the tracking store {mlflow_client.tracking_uri} "
                             f"({first[:200]}); pass the right --tracking-uri / --runs-root") from None


def run_dir_of(run) -> Path | None:
    path = run.data.tags.get("tracking.run_dir")
    return Path(path) if path and Path(path).is_dir() else None


def run_file(mlflow_client, run, name: str, dst_dir: str | Path) -> Path | None:
    """``name`` of ``run``: the file in its run folder, else its artifact downloaded to ``dst_dir``;
    None if neither exists."""
    folder = run_dir_of(run)
    if folder is not None and (folder / name).is_file():
        return folder / name
    try:
        names = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, os.path.dirname(name) or None)}
    except Exception:  # noqa: BLE001
        names = set()
    if name not in names:
        return None
    Path(dst_dir).mkdir(parents=True, exist_ok=True)
    return Path(mlflow_client.download_artifacts(run.info.run_id, name, str(dst_dir)))


def recorded_run_id(run_dir: str | Path) -> str | None:
    """The MLflow run id a run folder's ``RUN_ID_FILE`` holds (written by the launcher or the trainer), or None."""
    path = Path(run_dir) / RUN_ID_FILE
    return (path.read_text().strip() or None) if path.is_file() else None


def run_id_from_dir(run_dir: str | Path) -> str:
    """:func:`recorded_run_id` of a folder that must name one (a RunLookupError otherwise)."""
    run_id = recorded_run_id(run_dir)
    if run_id is None:
        raise RunLookupError(f"{run_dir}: no {RUN_ID_FILE} file (not a finished training run folder); "
                             f"train it first or pass its MLflow run id")
    return run_id


def all_experiment_ids(mlflow_client) -> list[str]:
    from mlflow.entities import ViewType

    return [e.experiment_id for e in mlflow_client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]


def study_runs(mlflow_client, study: str, stage: str | None = None, status: str | None = None) -> list:
    """Runs tagged ``study`` (and ``stage``), newest first, in every active experiment."""
    ids = all_experiment_ids(mlflow_client)
    if not ids:
        return []
    query = f"tags.study = '{_quote(study)}'"
    if stage is not None:
        query += f" and tags.stage = '{_quote(stage)}'"
    if status is not None:
        query += f" and attributes.status = '{status}'"
    runs = []
    page = None
    while True:
        batch = mlflow_client.search_runs(ids, query, max_results=1000, order_by=["attributes.start_time DESC"],
                                          page_token=page)
        runs.extend(batch)
        page = batch.token
        if not page:
            return runs


def _quote(text: str) -> str:
    return str(text).replace("'", "\\'")
