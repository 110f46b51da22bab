"""MLflow tracking for training runs (rank 0 only; other ranks use :class:`NullTracker`).

Design
------
* Every public call is **non-fatal**: tracking problems are logged, never raised into training.
* Calls go straight to the tracking store while it answers. HTTP requests are bounded: MLflow's
  client normally retries with exponential backoff for minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``
  = 7, ``MLFLOW_HTTP_REQUEST_TIMEOUT`` = 120 s); here each call runs with ``retries=0`` and a
  ``timeout`` of a couple of seconds (the variables are set only around our own calls and restored
  afterwards, so other MLflow use in the process keeps its defaults).
* When a call fails for a transient reason (server down, hung, 5xx, locked database) the tracker
  goes *offline*: that call and every later one are buffered in memory **and** appended to
  ``run_dir/tracking_buffer.jsonl`` (fsync'ed, so a crash loses nothing). While offline, calls
  return at once; at most every ``retry_interval`` seconds a call first probes the server
  (``GET /health``, bounded by ``timeout``) and, if it answers, flushes the buffer in order with
  the original steps and timestamps. MLflow's SQL store ignores an exact duplicate metric
  (same key/step/timestamp/value), so a replay after an ambiguous failure stays exactly-once.
* If the server is still unreachable at :meth:`Tracker.end`, the whole run as seen by this process
  (params, tags, every metric, the unsent artifacts) is written to a local fallback store
  ``sqlite:///run_dir/mlflow_fallback.db`` with tag ``tracking.fallback=true``; the journal is kept
  so ``python -m pipeline.tracking.tracker sync RUN_DIR`` can push the missing calls to the server later,
  and a warning says how to view and how to merge. A later :meth:`Tracker.start` in the same
  ``run_dir`` (``--resume auto``) also replays a leftover journal first.
* The embedded default store is a SQLite file (:func:`default_tracking_uri`); its schema is created
  under a file lock, because two processes creating a brand-new MLflow SQLite database at once
  crash (alembic races).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from typing import Any, Mapping
from urllib.parse import unquote

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before mlflow is imported anywhere here

__all__ = [
    "Tracker",
    "NullTracker",
    "default_tracking_uri",
    "ensure_sqlite_store",
    "BUFFER_FILE",
    "REJECTED_FILE",
    "FALLBACK_DB",
]

log = logging.getLogger(__name__)

BUFFER_FILE = "tracking_buffer.jsonl"      # pending (unsent) calls, one JSON op per line
REJECTED_FILE = "tracking_rejected.jsonl"  # calls the store refused (kept, not dropped); `sync` retries them
STATE_FILE = "tracking_state.json"         # uri / experiment / run id / params, for `sync`
FALLBACK_DB = "mlflow_fallback.db"         # local store written when the server never came back
FALLBACK_ARTIFACTS = "mlflow_fallback_artifacts"
STAGING_DIR = "tracking_artifacts"         # files made by log_dict/log_figure, copies of buffered ones

# MLflow limits (mlflow/utils/validation.py, 3.x)
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
_TRUNC_MARK = "...[truncated]"
_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")
# Error codes that will not get better by retrying: the call is dropped (with a warning).
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
                    "INVALID_STATE", "MALFORMED_REQUEST"}
_STATUSES = ("FINISHED", "FAILED", "KILLED")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _ensure_telemetry_off() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


# --------------------------------------------------------------------------------------------
# SQLite store
# --------------------------------------------------------------------------------------------
def _sqlite_path(uri: str) -> str:
    if not uri.startswith("sqlite:///"):
        raise ValueError(f"not a sqlite URI: {uri!r}")
    return os.path.abspath(unquote(uri[len("sqlite:///"):]))


def _artifact_root_for(db_path: str) -> str:
    return os.path.join(os.path.dirname(db_path), "mlartifacts")


_SQLITE_STORES: dict[str, Any] = {}
_SQLITE_LOCK = threading.Lock()


def ensure_sqlite_store(uri: str, artifact_root: str | None = None):
    """Create (if needed) an MLflow SQLite store safely and return a ``SqlAlchemyStore`` for it.

    Schema creation runs under an exclusive ``fcntl`` lock on ``<db>.lock``, so any number of
    processes may call this at once on a database that does not exist yet. Artifacts of
    experiments created through the returned store go to ``artifact_root`` (default: an
    ``mlartifacts`` folder beside the database), not to ``./mlruns`` of the current directory.
    """
    _ensure_telemetry_off()
    db_path = _sqlite_path(uri)
    root = os.path.abspath(artifact_root or _artifact_root_for(db_path))
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


def default_tracking_uri(runs_root: str) -> str:
    """The embedded default store: ``sqlite:///<abs runs_root>/mlflow.db``, artifacts in
    ``<runs_root>/mlartifacts``. The schema is created (safely, see :func:`ensure_sqlite_store`).
    View it with ``mlflow ui --backend-store-uri <this uri>``."""
    root = os.path.abspath(runs_root)
    os.makedirs(root, exist_ok=True)
    uri = "sqlite:///" + os.path.join(root, "mlflow.db")
    try:
        ensure_sqlite_store(uri)
    except Exception:  # not fatal: Tracker.start retries, then buffers / falls back
        log.exception("tracking: could not create the MLflow store %s", uri)
    return uri


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _clean_key(key: Any) -> str:
    k = _BAD_KEY_CHARS.sub("_", str(key))
    return k[:MAX_KEY_LENGTH] or "_"


def _clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - len(_TRUNC_MARK)] + _TRUNC_MARK


def _param_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, dict)):
        try:
            return json.dumps(v, default=str)
        except (TypeError, ValueError):
            pass
    return str(v)


def _is_permanent(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", None)
    if code in _PERMANENT_CODES:
        return True
    return isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError))


@contextlib.contextmanager
def _http_limits(timeout: float, retries: int):
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


def get_or_create_experiment(client, uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        if uri.startswith("sqlite:///"):
            # through our store so artifacts land beside the database, not in ./mlruns
            return ensure_sqlite_store(uri).create_experiment(name)
        return client.create_experiment(name)
    except Exception as e:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise e
        return exp.experiment_id


def read_jsonl(path: str) -> list[dict]:
    ops = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    ops.append(json.loads(line))
                except json.JSONDecodeError:  # torn last line after a crash
                    log.warning("tracking: skipping a corrupt line in %s", path)
    except FileNotFoundError:
        pass
    return ops


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# trackers
# --------------------------------------------------------------------------------------------
class NullTracker:
    """Does nothing (ranks other than 0, or tracking disabled). Same interface as Tracker."""

    run_id = None
    run_url = ""
    experiment_id = None
    offline = False

    def start(self, run_name, params=None, tags=None, run_id=None):
        return run_id

    def log_metrics(self, metrics, step, timestamp_ms=None):
        pass

    def log_params(self, params):
        pass

    def log_artifact(self, local_path, artifact_path=None):
        pass

    def log_dict(self, obj, artifact_file):
        pass

    def log_figure(self, fig, artifact_file):
        pass

    def set_tags(self, tags):
        pass

    def end(self, status="FINISHED"):
        pass


class Tracker:
    """MLflow run of one training run, robust to tracking-server outages (see module doc).

    Args:
        uri: tracking URI (``http(s)://host:port`` or ``sqlite:///...``; see :func:`default_tracking_uri`).
        experiment: experiment name (created if missing).
        run_dir: the training run's output folder (buffer journal, staged artifacts, fallback store).
        timeout: seconds one HTTP request may take (MLflow accepts whole seconds; min 1).
        artifact_timeout: per-request timeout for artifact uploads (preceded by a bounded probe).
        retry_interval: while offline, seconds between attempts to reach the server again.
        retries: MLflow HTTP retries per request (0: our own buffer does the retrying).
    """

    def __init__(self, uri: str, experiment: str, run_dir: str, *, timeout: float = 2,
                 artifact_timeout: float = 60, retry_interval: float = 15.0, retries: int = 0):
        _ensure_telemetry_off()
        self.uri = uri
        self.experiment = experiment
        self.run_dir = os.path.abspath(run_dir)
        self.timeout = timeout
        self.artifact_timeout = artifact_timeout
        self.retry_interval = retry_interval
        self.retries = retries
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.fallback_uri: str | None = None
        self._is_http = uri.startswith(("http://", "https://"))
        self._client = None
        self._pending: list[dict] = []
        self._metric_history: list[dict] = []   # every metrics op of this process (fallback)
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._run_name: str | None = None
        self._status: str | None = None
        self._online = True
        self._next_probe = 0.0
        self._ended = False
        self._started = False
        self._n_staged = 0
        self._n_buffered = 0
        self._lock = threading.RLock()
        os.makedirs(self.run_dir, exist_ok=True)

    # ---------------------------------------------------------------- properties
    @property
    def offline(self) -> bool:
        """True while calls are being buffered (server unreachable)."""
        return bool(self._pending) or not self._online

    @property
    def buffer_path(self) -> str:
        return os.path.join(self.run_dir, BUFFER_FILE)

    @property
    def run_url(self) -> str:
        if self.fallback_uri:
            return f"mlflow ui --backend-store-uri {self.fallback_uri}  (local fallback store)"
        if self.run_id is None:
            return f"(run not created yet: tracking server {self.uri} unreachable)"
        if self._is_http:
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        if self.uri.startswith("sqlite:///"):
            return (f"mlflow ui --backend-store-uri {self.uri}  then open "
                    f"http://127.0.0.1:5000/#/experiments/{self.experiment_id}/runs/{self.run_id}")
        return f"{self.uri} (experiment {self.experiment_id}, run {self.run_id})"

    # ---------------------------------------------------------------- public API
    def start(self, run_name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None, run_id: str | None = None) -> str | None:
        """Create the run (or resume ``run_id``: same run, status back to RUNNING) and log params
        and tags. Returns the run id; ``None`` only if the server was unreachable and no
        ``run_id`` was given (then the run is created when the server answers, see ``run_id``)."""
        with self._lock:
            try:
                self._started = True
                self._run_name = run_name
                params_s, truncated = self._prepare_params(params or {})
                self._params = params_s
                self._tags = {_clean_key(k): _clip(str(v), MAX_TAG_VAL_LENGTH)
                              for k, v in (tags or {}).items()}
                self._tags.setdefault("tracking.run_dir", self.run_dir)
                if truncated:
                    self._tags["tracking.truncated_params"] = _clip(",".join(truncated), MAX_TAG_VAL_LENGTH)
                if run_id:
                    self.run_id = run_id
                leftovers = [op for op in read_jsonl(self.buffer_path)
                             if op.get("op") not in ("start", "end")]
                op = {"op": "start", "run_name": run_name, "params": self._params,
                      "tags": self._tags, "run_id": run_id, "created": False}
                if leftovers:
                    log.warning("tracking: %d calls left unsent by an earlier process in %s will be "
                                "replayed into this run", len(leftovers), self.buffer_path)
                    self._pending = [op] + leftovers
                    self._rewrite_journal()
                    self._metric_history.extend(o for o in leftovers if o["op"] == "metrics")
                    if self._can_try():
                        self._flush()
                else:
                    self._submit(op)
                if truncated:
                    self.log_dict(dict(params or {}), "params_full.json")
                self._save_state()
            except Exception:  # never into training
                log.exception("tracking: start failed (training continues)")
            return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """Log metrics at `step`. A call repeated with the same `timestamp_ms` (and values) is
        ignored by MLflow's store: pipeline.train.metrics_journal relies on that for exactly-once."""
        with self._lock:
            try:
                clean = {}
                for k, v in metrics.items():
                    try:
                        clean[_clean_key(k)] = float(v)
                    except (TypeError, ValueError):
                        log.warning("tracking: metric %r=%r is not a number; skipped", k, v)
                if not clean:
                    return
                op = {"op": "metrics", "metrics": clean, "step": int(step),
                      "ts": int(timestamp_ms) if timestamp_ms is not None else _now_ms()}
                self._metric_history.append(op)
                self._submit(op)
            except Exception:
                log.exception("tracking: log_metrics failed (training continues)")

    def log_params(self, params: Mapping[str, Any]) -> None:
        with self._lock:
            try:
                p, truncated = self._prepare_params(params)
                self._params.update(p)
                if truncated:
                    log.warning("tracking: params truncated to %d chars: %s", MAX_PARAM_VAL_LENGTH, truncated)
                self._submit({"op": "params", "params": p})
            except Exception:
                log.exception("tracking: log_params failed (training continues)")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        with self._lock:
            try:
                t = {_clean_key(k): _clip(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}
                self._tags.update(t)
                self._submit({"op": "tags", "tags": t})
            except Exception:
                log.exception("tracking: set_tags failed (training continues)")

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Upload a file (or a directory, as ``artifact_path/<dirname>``)."""
        with self._lock:
            try:
                local_path = os.path.abspath(local_path)
                if not os.path.exists(local_path):
                    log.warning("tracking: artifact %s does not exist; skipped", local_path)
                    return
                self._submit({"op": "artifact", "local_path": local_path,
                              "artifact_path": artifact_path or None})
            except Exception:
                log.exception("tracking: log_artifact failed (training continues)")

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Save ``obj`` as JSON (or YAML for ``.yaml``/``.yml``) under ``artifact_file``."""
        with self._lock:
            try:
                path = self._staging_path(artifact_file)
                if artifact_file.endswith((".yaml", ".yml")):
                    import yaml

                    text = yaml.safe_dump(json.loads(json.dumps(obj, default=str)), sort_keys=False)
                else:
                    text = json.dumps(obj, indent=2, default=str)
                _atomic_write(path, text)
                self.log_artifact(path, os.path.dirname(artifact_file) or None)
            except Exception:
                log.exception("tracking: log_dict failed (training continues)")

    def log_figure(self, fig, artifact_file: str) -> None:
        """Save a matplotlib figure (PNG unless the extension says otherwise) under ``artifact_file``."""
        with self._lock:
            try:
                path = self._staging_path(artifact_file)
                fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
                self.log_artifact(path, os.path.dirname(artifact_file) or None)
            except Exception:
                log.exception("tracking: log_figure failed (training continues)")

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the run. If the server is still unreachable, write the local fallback store."""
        with self._lock:
            if self._ended or not self._started:
                return
            self._ended = True
            try:
                status = str(status).upper()
                if status not in _STATUSES:
                    log.warning("tracking: unknown status %r, using FAILED", status)
                    status = "FAILED"
                self._status = status
                self._submit({"op": "end", "status": status, "ts": _now_ms()})
                if self._pending:  # one last, bounded attempt regardless of retry_interval
                    self._next_probe = 0.0
                    if self._can_try():
                        self._flush()
                if self._pending:
                    self._write_fallback()
                self._save_state()
            except Exception:
                log.exception("tracking: end failed")

    # ---------------------------------------------------------------- core
    def _prepare_params(self, params: Mapping[str, Any]) -> tuple[dict[str, str], list[str]]:
        out, truncated = {}, []
        for k, v in params.items():
            key, val = _clean_key(k), _param_str(v)
            if len(val) > MAX_PARAM_VAL_LENGTH:
                truncated.append(key)
                val = _clip(val, MAX_PARAM_VAL_LENGTH)
            out[key] = val
        return out, truncated

    def _staging_path(self, artifact_file: str) -> str:
        rel = os.path.normpath(artifact_file).lstrip(os.sep)
        if rel.startswith(".."):
            raise ValueError(f"artifact_file must be a relative path: {artifact_file!r}")
        path = os.path.join(self.run_dir, STAGING_DIR, "files", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def _client_for(self):
        if self._client is None:
            from mlflow import MlflowClient

            if self.uri.startswith("sqlite:///"):
                ensure_sqlite_store(self.uri)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _submit(self, op: dict) -> None:
        if not self._pending and self._can_try(artifact=op["op"] == "artifact"):
            try:
                self._apply(self._client_for(), op)
                return
            except Exception as e:
                if _is_permanent(e):
                    self._keep_rejected(op, e)
                    return
                self._went_offline(e)
        self._enqueue(op)
        if len(self._pending) > 1 and self._can_try():
            self._flush()

    def _can_try(self, artifact: bool = False) -> bool:
        """Whether to talk to the store now. Offline: a bounded probe at most every retry_interval."""
        if self._online:
            if artifact and self._is_http and not self._probe():
                self._went_offline(ConnectionError("health probe before artifact upload failed"))
                return False
            return True
        now = time.monotonic()
        if now < self._next_probe:
            return False
        self._next_probe = now + self.retry_interval
        if self._probe():
            self._online = True
            log.warning("tracking: %s reachable again; flushing %d buffered calls",
                        self.uri, len(self._pending))
            return True
        return False

    def _probe(self) -> bool:
        if not self._is_http:
            return True
        import requests

        try:
            r = requests.get(self.uri.rstrip("/") + "/health", timeout=self.timeout)
            return r.status_code == 200
        except Exception:
            return False

    def _went_offline(self, exc: BaseException) -> None:
        if self._online:
            log.warning(
                "tracking: %s unreachable (%s). Training continues; tracking calls are buffered in %s "
                "and sent when it answers again (retry every %.3g s).",
                self.uri, str(exc).splitlines()[0][:300], self.buffer_path, self.retry_interval)
        self._online = False
        self._next_probe = time.monotonic() + self.retry_interval

    def _enqueue(self, op: dict) -> None:
        if op["op"] == "artifact":
            op = dict(op, local_path=self._stage_copy(op["local_path"]))
        self._pending.append(op)
        self._n_buffered += 1
        with open(self.buffer_path, "a") as f:
            f.write(json.dumps(op) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _keep_rejected(self, op: dict, exc: BaseException) -> None:
        """A call the store refused is never dropped: it goes to REJECTED_FILE, which `sync` retries."""
        if op["op"] == "artifact" and STAGING_DIR not in op["local_path"]:
            op = dict(op, local_path=self._stage_copy(op["local_path"]))
        reason = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)[:300]
        path = os.path.join(self.run_dir, REJECTED_FILE)
        with open(path, "a") as f:
            f.write(json.dumps(dict(op, rejected=reason)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._save_state()
        log.warning("tracking: %s call rejected by %s (%s); kept in %s: `python -m pipeline.tracking.tracker sync %s "
                    "[--uri URI]` sends it again", op["op"], self.uri, reason, path, self.run_dir)

    def _stage_copy(self, src: str) -> str:
        """Snapshot a file/dir that is waiting to be uploaded (the original may change)."""
        self._n_staged += 1
        dst_dir = os.path.join(self.run_dir, STAGING_DIR, "buffered", f"{os.getpid()}_{self._n_staged:05d}")
        os.makedirs(dst_dir, exist_ok=True)
        dst = os.path.join(dst_dir, os.path.basename(src.rstrip(os.sep)))
        if os.path.isdir(src):
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
        return dst

    def _rewrite_journal(self) -> None:
        if self._pending:
            _atomic_write(self.buffer_path, "".join(json.dumps(o) + "\n" for o in self._pending))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.buffer_path)

    def _flush(self) -> None:
        """Send pending calls in order; stop at the first transient failure."""
        client = self._client_for()
        sent = 0
        try:
            while self._pending:
                op = self._pending[0]
                try:
                    self._apply(client, op)
                except Exception as e:
                    if not _is_permanent(e):
                        self._went_offline(e)
                        return
                    self._keep_rejected(op, e)
                self._pending.pop(0)
                sent += 1
        finally:
            if sent:
                self._rewrite_journal()
                self._save_state()
                if not self._pending:
                    log.warning("tracking: all buffered calls sent to %s", self.uri)
                    if self.run_id:  # leave a trace of the outage on the run itself
                        with contextlib.suppress(Exception), _http_limits(self.timeout, self.retries):
                            client.set_tag(self.run_id, "tracking.buffered_calls", str(self._n_buffered))

    def _apply(self, client, op: dict) -> None:
        """One call against a store. Idempotent (a replay after an ambiguous failure is harmless)."""
        from mlflow.entities import Metric, Param, RunTag

        kind = op["op"]
        limits = _http_limits(self.artifact_timeout if kind == "artifact" else self.timeout, self.retries)
        with limits:
            if kind == "start":
                self._apply_start(client, op)
                return
            if self.run_id is None:
                raise ConnectionError("run not created yet")
            if kind == "metrics":
                client.log_batch(self.run_id, metrics=[
                    Metric(k, v, op["ts"], op["step"]) for k, v in op["metrics"].items()])
            elif kind == "params":
                existing = client.get_run(self.run_id).data.params
                new = {k: v for k, v in op["params"].items() if k not in existing}
                changed = sorted(k for k, v in op["params"].items() if k in existing and existing[k] != v)
                if changed:
                    log.warning("tracking: params already logged with other values kept: %s", changed)
                if new:
                    client.log_batch(self.run_id, params=[Param(k, v) for k, v in new.items()])
            elif kind == "tags":
                client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
            elif kind == "artifact":
                path, apath = op["local_path"], op.get("artifact_path")
                if os.path.isdir(path):
                    sub = os.path.basename(path.rstrip(os.sep))
                    client.log_artifacts(self.run_id, path, f"{apath}/{sub}" if apath else sub)
                else:
                    client.log_artifact(self.run_id, path, apath)
            elif kind == "end":
                client.set_terminated(self.run_id, op["status"], end_time=op["ts"])
            else:
                log.warning("tracking: unknown buffered op %r ignored", kind)

    def _apply_start(self, client, op: dict) -> None:
        from mlflow.entities import Param, RunTag

        if self.experiment_id is None:
            self.experiment_id = get_or_create_experiment(client, self.uri, self.experiment)
        rid = op.get("run_id")
        run = None
        if rid:
            try:
                run = client.get_run(rid)
            except Exception as e:
                if getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("tracking: run %s to resume does not exist in %s; starting a new run",
                            rid, self.uri)
        if run is None:
            run = client.create_run(self.experiment_id, run_name=op["run_name"])
            # from now on a replay of this op resumes instead of creating a second run
            op["run_id"], op["created"] = run.info.run_id, True
        else:
            if run.info.experiment_id != self.experiment_id:
                self.experiment_id = run.info.experiment_id
            if not op.get("created"):
                log.warning("tracking: resuming MLflow run %s (%s)", run.info.run_id, run.info.status)
            client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        existing = run.data.params
        new = {k: v for k, v in op["params"].items() if k not in existing}
        changed = {k: v for k, v in op["params"].items() if k in existing and existing[k] != v}
        tags = dict(op["tags"])
        if changed:
            log.warning("tracking: resumed run keeps its original values of %s (MLflow params are "
                        "immutable); new values are in tag resume.changed_params", sorted(changed))
            tags["resume.changed_params"] = _clip(json.dumps(changed), MAX_TAG_VAL_LENGTH)
        client.log_batch(self.run_id, params=[Param(k, v) for k, v in new.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        self._save_state()

    # ---------------------------------------------------------------- state / fallback
    def _save_state(self) -> None:
        try:
            state = {"uri": self.uri, "experiment": self.experiment, "run_name": self._run_name,
                     "run_id": self.run_id, "experiment_id": self.experiment_id,
                     "status": self._status, "fallback_uri": self.fallback_uri,
                     "pending": len(self._pending), "params": self._params, "tags": self._tags}
            _atomic_write(os.path.join(self.run_dir, STATE_FILE), json.dumps(state, indent=1))
        except Exception:
            log.exception("tracking: could not write %s", STATE_FILE)

    def _write_fallback(self) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        db = os.path.join(self.run_dir, FALLBACK_DB)
        uri = "sqlite:///" + db
        ensure_sqlite_store(uri, os.path.join(self.run_dir, FALLBACK_ARTIFACTS))
        client = MlflowClient(tracking_uri=uri)
        exp_id = get_or_create_experiment(client, uri, self.experiment)
        tags = dict(self._tags)
        tags.update({"tracking.fallback": "true", "tracking.intended_uri": self.uri,
                     "tracking.intended_run_id": self.run_id or "none (never created)",
                     "tracking.fallback_note": "all params, tags and metrics of this process; "
                     "only the artifacts that were not uploaded"})
        run = client.create_run(exp_id, run_name=self._run_name, tags=tags)
        fid = run.info.run_id
        client.log_batch(fid, params=[Param(k, v) for k, v in self._params.items()])
        metrics = [Metric(k, v, op["ts"], op["step"])
                   for op in self._metric_history for k, v in op["metrics"].items()]
        client.log_batch(fid, metrics=metrics)
        for op in self._pending:
            try:
                if op["op"] == "artifact":
                    p, a = op["local_path"], op.get("artifact_path")
                    if os.path.isdir(p):
                        sub = os.path.basename(p.rstrip(os.sep))
                        client.log_artifacts(fid, p, f"{a}/{sub}" if a else sub)
                    else:
                        client.log_artifact(fid, p, a)
            except Exception:
                log.exception("tracking: fallback artifact %s not written", op.get("local_path"))
        client.set_terminated(fid, self._status or "FINISHED")
        self.fallback_uri = uri
        log.warning(
            "tracking: %s still unreachable at the end of the run: %d calls could not be sent.\n"
            "  The run was written to a local fallback store (run %s, tag tracking.fallback=true):\n"
            "    view : mlflow ui --backend-store-uri %s\n"
            "  The unsent calls are kept in %s; push them into %s later with:\n"
            "    merge: python -m pipeline.tracking.tracker sync %s",
            self.uri, len(self._pending), fid, uri, self.buffer_path, self.uri, self.run_dir)


