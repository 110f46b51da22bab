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
  so ``python -m pipeline.tracking sync RUN_DIR`` can push the missing calls to the server later,
  and a warning says how to view and how to merge. A later :meth:`Tracker.start` in the same
  ``run_dir`` (``--resume auto``) also replays a leftover journal first.
* The files in ``run_dir``: :mod:`pipeline.tracking.journal`; the store, its limits and links:
  :mod:`pipeline.tracking.store`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from typing import Any, Mapping

from pipeline.tracking.journal import (BUFFER_FILE, REJECTED_FILE, STAGING_DIR, STATE_FILE, append_jsonl,
                                       read_jsonl, rewrite_jsonl, send_op, split_params, stage_copy,
                                       write_fallback, write_state)
from pipeline.tracking.store import (MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH, clean_key, clip,
                                     ensure_sqlite_store, get_or_create_experiment, http_limits, is_permanent,
                                     param_str, server_answers, where_to_view)
from ssal_datasets.files import atomic_write

__all__ = ["Tracker", "NullTracker"]

log = logging.getLogger(__name__)

_STATUSES = ("FINISHED", "FAILED", "KILLED")
_UPLOADS = ("artifact", "model")  # ops that send files: longer timeout, a probe first, a snapshot when buffered


def _now_ms() -> int:
    return int(time.time() * 1000)


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

    def log_artifact(self, local_path, artifact_path=None):
        pass

    def log_model(self, local_path, name):
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
        uri: tracking URI (``http(s)://host:port`` or ``sqlite:///...``; the engine's default:
            :func:`pipeline.tracking.store.default_tracking_uri`).
        experiment: experiment name (created if missing).
        run_dir: the training run's output folder (buffer journal, staged artifacts, fallback store).
        timeout: seconds one HTTP request may take (MLflow accepts whole seconds; min 1).
        artifact_timeout: per-request timeout for artifact uploads (preceded by a bounded probe).
        retry_interval: while offline, seconds between attempts to reach the server again.
        retries: MLflow HTTP retries per request (0: our own buffer does the retrying).
    """

    def __init__(self, uri: str, experiment: str, run_dir: str, *, timeout: float = 2,
                 artifact_timeout: float = 60, retry_interval: float = 15.0, retries: int = 0):
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
    def unsent(self) -> int:
        """How many calls are buffered, not sent yet (after :meth:`end`: those kept for ``sync``)."""
        return len(self._pending)

    @property
    def buffer_path(self) -> str:
        return os.path.join(self.run_dir, BUFFER_FILE)

    @property
    def run_url(self) -> str:
        if self.fallback_uri:
            return f"mlflow ui --backend-store-uri {self.fallback_uri}  (local fallback store)"
        if self.run_id is None:
            return f"(run not created yet: tracking server {self.uri} unreachable)"
        return where_to_view(self.uri, self.experiment_id, self.run_id)

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
                clean_params, truncated = self._prepare_params(params or {})
                self._params = clean_params
                self._tags = {clean_key(k): clip(str(v), MAX_TAG_VAL_LENGTH)
                              for k, v in (tags or {}).items()}
                self._tags.setdefault("tracking.run_dir", self.run_dir)
                if truncated:
                    self._tags["tracking.truncated_params"] = clip(",".join(truncated), MAX_TAG_VAL_LENGTH)
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
                    rewrite_jsonl(self.buffer_path, self._pending)
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
                        clean[clean_key(k)] = float(v)
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

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        with self._lock:
            try:
                clean_tags = {clean_key(k): clip(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}
                self._tags.update(clean_tags)
                self._submit({"op": "tags", "tags": clean_tags})
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

    def log_model(self, local_path: str, name: str) -> None:
        """Log the MLflow model saved in the folder ``local_path`` as the run's model ``name``
        (``runs:/<run_id>/<name>``). Journaled like an artifact while the store is away; not written to the
        fallback store (the folder itself loads with ``mlflow.pytorch.load_model``): ``sync`` logs it."""
        with self._lock:
            try:
                local_path = os.path.abspath(local_path)
                if not os.path.isdir(local_path):
                    log.warning("tracking: model folder %s does not exist; skipped", local_path)
                    return
                self._submit({"op": "model", "local_path": local_path, "name": name})
            except Exception:
                log.exception("tracking: log_model failed (training continues)")

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
                atomic_write(path, text)
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
            key, val = clean_key(k), param_str(v)
            if len(val) > MAX_PARAM_VAL_LENGTH:
                truncated.append(key)
                val = clip(val, MAX_PARAM_VAL_LENGTH)
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
        if not self._pending and self._can_try(artifact=op["op"] in _UPLOADS):
            try:
                self._apply(self._client_for(), op)
                return
            except Exception as e:
                if is_permanent(e):
                    self._keep_rejected(op, e)
                    return
                self._went_offline(e)
        self._enqueue(op)
        if len(self._pending) > 1 and self._can_try():
            self._flush()

    def _can_try(self, artifact: bool = False) -> bool:
        """Whether to talk to the store now. Offline: a bounded probe at most every retry_interval."""
        if self._online:
            if artifact and self._is_http and not server_answers(self.uri, self.timeout):
                self._went_offline(ConnectionError("health probe before artifact upload failed"))
                return False
            return True
        now = time.monotonic()
        if now < self._next_probe:
            return False
        self._next_probe = now + self.retry_interval
        if server_answers(self.uri, self.timeout):
            self._online = True
            log.warning("tracking: %s reachable again; flushing %d buffered calls",
                        self.uri, len(self._pending))
            return True
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
        if op["op"] in _UPLOADS:
            op = dict(op, local_path=self._stage_copy(op["local_path"]))
        self._pending.append(op)
        self._n_buffered += 1
        append_jsonl(self.buffer_path, [op])

    def _keep_rejected(self, op: dict, exc: BaseException) -> None:
        """A call the store refused is never dropped: it goes to REJECTED_FILE, which `sync` retries."""
        if op["op"] in _UPLOADS and STAGING_DIR not in op["local_path"]:
            op = dict(op, local_path=self._stage_copy(op["local_path"]))
        reason = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)[:300]
        path = os.path.join(self.run_dir, REJECTED_FILE)
        append_jsonl(path, [dict(op, rejected=reason)])
        self._save_state()
        log.warning("tracking: %s call rejected by %s (%s); kept in %s: `python -m pipeline.tracking sync %s "
                    "[--uri URI]` sends it again", op["op"], self.uri, reason, path, self.run_dir)

    def _stage_copy(self, src: str) -> str:
        """Snapshot a file/dir that is waiting to be uploaded (the original may change)."""
        self._n_staged += 1
        return stage_copy(self.run_dir, src, f"{os.getpid()}_{self._n_staged:05d}")

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
                    if not is_permanent(e):
                        self._went_offline(e)
                        return
                    self._keep_rejected(op, e)
                self._pending.pop(0)
                sent += 1
        finally:
            if sent:
                rewrite_jsonl(self.buffer_path, self._pending)
                self._save_state()
                if not self._pending:
                    log.warning("tracking: all buffered calls sent to %s", self.uri)
                    if self.run_id:  # leave a trace of the outage on the run itself
                        with contextlib.suppress(Exception), http_limits(self.timeout, self.retries):
                            client.set_tag(self.run_id, "tracking.buffered_calls", str(self._n_buffered))

    def _apply(self, client, op: dict) -> None:
        """One call against a store. Idempotent (a replay after an ambiguous failure is harmless)."""
        with http_limits(self.artifact_timeout if op["op"] in _UPLOADS else self.timeout, self.retries):
            if op["op"] == "start":
                self._apply_start(client, op)
            elif self.run_id is None:
                raise ConnectionError("run not created yet")
            else:
                send_op(client, self.run_id, op)

    def _apply_start(self, client, op: dict) -> None:
        from mlflow.entities import Param, RunTag

        if self.experiment_id is None:
            self.experiment_id = get_or_create_experiment(client, self.uri, self.experiment)
        resume_id = op.get("run_id")
        run = None
        if resume_id:
            try:
                run = client.get_run(resume_id)
            except Exception as e:
                if getattr(e, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("tracking: run %s to resume does not exist in %s; starting a new run",
                            resume_id, self.uri)
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
        new, changed = split_params(run.data.params, op["params"])
        tags = dict(op["tags"])
        if changed:
            log.warning("tracking: resumed run keeps its original values of %s (MLflow params are "
                        "immutable); new values are in tag resume.changed_params", sorted(changed))
            tags["resume.changed_params"] = clip(json.dumps(changed), MAX_TAG_VAL_LENGTH)
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
            write_state(self.run_dir, state)
        except Exception:
            log.exception("tracking: could not write %s", STATE_FILE)

    def _write_fallback(self) -> None:
        uri, fallback_run_id = write_fallback(
            self.run_dir, self.uri, self.run_id, self.experiment, self._run_name, self._params, self._tags,
            self._metric_history, [op for op in self._pending if op["op"] == "artifact"], self._status or "FINISHED")
        self.fallback_uri = uri
        log.warning(
            "tracking: %s still unreachable at the end of the run: %d calls could not be sent.\n"
            "  The run was written to a local fallback store (run %s, tag tracking.fallback=true):\n"
            "    view : mlflow ui --backend-store-uri %s\n"
            "  The unsent calls are kept in %s; push them into %s later with:\n"
            "    merge: python -m pipeline.tracking sync %s",
            self.uri, len(self._pending), fallback_run_id, uri, self.buffer_path, self.uri, self.run_dir)
        for op in self._pending:
            if op["op"] == "model":
                log.warning("tracking: the model is not in the fallback store; sync logs it as runs:/<run id>/%s; "
                            "meanwhile mlflow.pytorch.load_model(%r) loads it", op["name"], op["local_path"])
