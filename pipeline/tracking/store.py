"""The MLflow store as the pipeline uses it: where it is, what it accepts, how to reach it, how to view it.

* The embedded default store is a SQLite file ``<runs_root>/mlflow.db`` (:func:`sqlite_uri`,
  :func:`default_tracking_uri`); its schema is created under a file lock
  (:func:`ensure_sqlite_store`), because two processes creating a brand-new MLflow SQLite
  database at once crash (alembic races). Artifacts go to ``mlartifacts`` beside the database.
* Our experiments are training experiments (:func:`get_or_create_experiment` tags them
  ``mlflow.experimentKind``) and every UI link we print opens MLflow's Model-training view
  (:func:`ui_url`, :func:`where_to_view`): MLflow 3's UI shows experiments in its GenAI view
  unless the link carries ``?workflowType=machine_learning``.
* Keys and values are cleaned to MLflow's limits (:func:`clean_key`, :func:`clip`,
  :func:`param_str`); :func:`http_limits` bounds MLflow's HTTP client for our calls, and
  :func:`is_permanent` tells an error that retrying will not fix.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import threading
from typing import Any
from urllib.parse import unquote

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported anywhere here

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_DB", "DEFAULT_UI", "EXPERIMENT_KIND_TAG", "TRAINING_EXPERIMENT_KIND", "MAX_PARAM_VAL_LENGTH",
    "MAX_TAG_VAL_LENGTH", "MAX_KEY_LENGTH", "sqlite_uri", "sqlite_path", "ensure_sqlite_store",
    "default_tracking_uri", "get_or_create_experiment", "upload_artifact", "ui_url", "where_to_view",
    "experiment_link",
    "clean_key", "clip", "param_str", "server_answers", "is_permanent", "http_limits",
]

#: File name of the embedded default store inside ``runs_root``.
DEFAULT_DB = "mlflow.db"
#: Where ``mlflow ui`` serves by default (the links printed for a SQLite store point there).
DEFAULT_UI = "http://127.0.0.1:5000"
#: Experiment tag that MLflow 3's UI reads to choose its view, and the value of a model-training
#: experiment (``ExperimentKind.CUSTOM_MODEL_DEVELOPMENT`` in the UI's sources).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"
# The URL parameter that opens MLflow 3.x's Model-training view (the tag alone does not, in 3.17).
_TRAINING_VIEW = "workflowType=machine_learning"

# MLflow limits (mlflow/utils/validation.py, 3.x)
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
_TRUNC_MARK = "...[truncated]"
_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")
# Error codes that will not get better by retrying.
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
                    "INVALID_STATE", "MALFORMED_REQUEST"}


# --------------------------------------------------------------------------------------------
# SQLite store
# --------------------------------------------------------------------------------------------
def sqlite_uri(folder: str | os.PathLike, db_name: str = DEFAULT_DB) -> str:
    """``sqlite:///<abs folder>/<db_name>``; nothing is created (see :func:`default_tracking_uri`)."""
    return "sqlite:///" + os.path.join(os.path.abspath(folder), db_name)


def sqlite_path(uri: str) -> str:
    """The database file of a ``sqlite:///`` URI (absolute)."""
    if not uri.startswith("sqlite:///"):
        raise ValueError(f"not a sqlite URI: {uri!r}")
    return os.path.abspath(unquote(uri[len("sqlite:///"):]))


_SQLITE_STORES: dict[str, Any] = {}
_SQLITE_LOCK = threading.Lock()


def ensure_sqlite_store(uri: str, artifact_root: str | None = None):
    """Create (if needed) an MLflow SQLite store safely and return a ``SqlAlchemyStore`` for it.

    Schema creation runs under an exclusive ``fcntl`` lock on ``<db>.lock``, so any number of
    processes may call this at once on a database that does not exist yet. Artifacts of
    experiments created through the returned store go to ``artifact_root`` (default: an
    ``mlartifacts`` folder beside the database), not to ``./mlruns`` of the current directory.
    """
    db_path = sqlite_path(uri)
    root = os.path.abspath(artifact_root or os.path.join(os.path.dirname(db_path), "mlartifacts"))
    with _SQLITE_LOCK:
        if uri in _SQLITE_STORES:
            return _SQLITE_STORES[uri]
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.utils.file_utils import path_to_local_file_uri

        os.makedirs(os.path.dirname(db_path), exist_ok=True)
        os.makedirs(root, exist_ok=True)
        with open(db_path + ".lock", "a+") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                store = SqlAlchemyStore(uri, path_to_local_file_uri(root))
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
        _SQLITE_STORES[uri] = store
        return store


def default_tracking_uri(runs_root: str | os.PathLike) -> str:
    """The embedded default store: ``sqlite:///<abs runs_root>/mlflow.db``, artifacts in
    ``<runs_root>/mlartifacts``. The schema is created (safely, see :func:`ensure_sqlite_store`).
    View it with ``mlflow ui --backend-store-uri <this uri>``."""
    os.makedirs(os.path.abspath(runs_root), exist_ok=True)
    uri = sqlite_uri(runs_root)
    try:
        ensure_sqlite_store(uri)
    except Exception:  # not fatal: Tracker.start retries, then buffers / falls back
        log.exception("tracking: could not create the MLflow store %s", uri)
    return uri


# --------------------------------------------------------------------------------------------
# experiments, artifacts
# --------------------------------------------------------------------------------------------
def get_or_create_experiment(client, uri: str, name: str) -> str:
    """The id of experiment ``name`` (restored if deleted, created if missing), tagged as a
    model-training experiment (:data:`EXPERIMENT_KIND_TAG`)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            kind = {EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND}
            if uri.startswith("sqlite:///"):
                from mlflow.entities import ExperimentTag

                # through our store so artifacts land beside the database, not in ./mlruns
                return ensure_sqlite_store(uri).create_experiment(
                    name, tags=[ExperimentTag(k, v) for k, v in kind.items()])
            return client.create_experiment(name, tags=kind)
        except Exception as e:  # created concurrently by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise e
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if exp.tags.get(EXPERIMENT_KIND_TAG) != TRAINING_EXPERIMENT_KIND:  # made before we tagged, or by the UI
        try:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)
        except Exception as e:  # only how the UI shows it: never a reason to hold a run up
            log.warning("tracking: could not tag experiment %s as a training experiment (%s)",
                        exp.experiment_id, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
    return exp.experiment_id


def upload_artifact(client, run_id: str, local_path: str, artifact_path: str | None) -> None:
    """A file as ``artifact_path/<name>``, a folder as ``artifact_path/<folder name>/...``."""
    if os.path.isdir(local_path):
        folder = os.path.basename(local_path.rstrip(os.sep))
        client.log_artifacts(run_id, local_path, f"{artifact_path}/{folder}" if artifact_path else folder)
    else:
        client.log_artifact(run_id, local_path, artifact_path)


# --------------------------------------------------------------------------------------------
# UI links
# --------------------------------------------------------------------------------------------
def ui_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of a run (or of an experiment's run list), in the Model-training view."""
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/{page}?{_TRAINING_VIEW}"


def where_to_view(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """How a user opens a run (or an experiment) of the store at ``uri``: the link for a tracking
    server; for a SQLite store, the ``mlflow ui`` command and then the link."""
    if uri.startswith(("http://", "https://")):
        return ui_url(uri, experiment_id, run_id)
    if uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {uri}  then open {ui_url(DEFAULT_UI, experiment_id, run_id)}"
    return f"{uri} (experiment {experiment_id}" + (f", run {run_id})" if run_id else ")")


def experiment_link(uri: str, experiment: str) -> str:
    """:func:`where_to_view` for the run list of experiment ``experiment`` (by name); "" when the store
    does not have it or does not answer within a few seconds."""
    from mlflow import MlflowClient

    try:
        with http_limits(5, 0):
            found = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    except Exception:  # noqa: BLE001 - a link is a courtesy, never a failure
        return ""
    return where_to_view(uri, found.experiment_id) if found is not None else ""


# --------------------------------------------------------------------------------------------
# what the store accepts, how long we wait for it
# --------------------------------------------------------------------------------------------
def clean_key(key: Any) -> str:
    """A metric/param/tag key MLflow accepts: other characters become ``_``, at most 250 long."""
    k = _BAD_KEY_CHARS.sub("_", str(key))
    return k[:MAX_KEY_LENGTH] or "_"


def clip(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, marked as truncated."""
    return value if len(value) <= limit else value[: limit - len(_TRUNC_MARK)] + _TRUNC_MARK


def param_str(v: Any) -> str:
    """A param value as MLflow stores it (lists and dicts as JSON)."""
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, dict)):
        try:
            return json.dumps(v, default=str)
        except (TypeError, ValueError):
            pass
    return str(v)


def server_answers(uri: str, timeout: float) -> bool:
    """Whether the tracking server at ``uri`` answers its health check within ``timeout`` seconds
    (a store that is not a server: always)."""
    if not uri.startswith(("http://", "https://")):
        return True
    import requests

    try:
        return requests.get(uri.rstrip("/") + "/health", timeout=timeout).status_code == 200
    except Exception:
        return False


def is_permanent(exc: BaseException) -> bool:
    """Whether retrying the call that raised ``exc`` is pointless (a refusal, a missing file)."""
    code = getattr(exc, "error_code", None)
    if code in _PERMANENT_CODES:
        return True
    return isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError))


@contextlib.contextmanager
def http_limits(timeout: float, retries: int):
    """Bound MLflow's HTTP client for the calls inside (it reads these variables per request)."""
    new = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(math.ceil(timeout)))),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(retries)),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    }
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
