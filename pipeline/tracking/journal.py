"""What the tracker keeps in a run folder while the tracking store is away, and the local fallback store.

* ``tracking_buffer.jsonl``: the calls not sent yet, one JSON op per line, appended and fsync'ed
  (:func:`append_jsonl`), so a crash loses nothing; a torn last line is skipped on reading
  (:func:`read_jsonl`).
* ``tracking_rejected.jsonl``: the calls the store refused (kept, not dropped); ``sync`` retries them.
* ``tracking_state.json``: uri / experiment / run id / params of the run, for ``sync``.
* ``tracking_artifacts/``: the files made by ``log_dict`` / ``log_figure`` and snapshots of artifacts
  waiting to be uploaded (:func:`stage_copy`: the original may change meanwhile).
* ``mlflow_fallback.db`` (+ ``mlflow_fallback_artifacts/``): written by :func:`write_fallback` when the
  store never came back before the run ended.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import Iterable, Mapping

from pipeline.tracking.store import ensure_sqlite_store, get_or_create_experiment, sqlite_uri, upload_artifact
from ssal_datasets.files import atomic_write

# One op per tracking call: {"op": "start"|"metrics"|"params"|"tags"|"artifact"|"model"|"end", ...its arguments}.

__all__ = ["BUFFER_FILE", "REJECTED_FILE", "STATE_FILE", "FALLBACK_DB", "FALLBACK_ARTIFACTS", "STAGING_DIR",
           "read_jsonl", "append_jsonl", "rewrite_jsonl", "write_state", "read_state", "send_op", "split_params", "stage_copy", "write_fallback"]

log = logging.getLogger(__name__)

BUFFER_FILE = "tracking_buffer.jsonl"      # pending (unsent) calls, one JSON op per line
REJECTED_FILE = "tracking_rejected.jsonl"  # calls the store refused (kept, not dropped); `sync` retries them
STATE_FILE = "tracking_state.json"         # uri / experiment / run id / params, for `sync`
FALLBACK_DB = "mlflow_fallback.db"         # local store written when the server never came back
FALLBACK_ARTIFACTS = "mlflow_fallback_artifacts"
STAGING_DIR = "tracking_artifacts"         # files made by log_dict/log_figure, copies of buffered ones


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The ops of a journal (none if it does not exist)."""
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


def rewrite_jsonl(path: str, ops: list[dict]) -> None:
    """Replace a journal by ``ops`` (atomically); no ops: no file."""
    if ops:
        atomic_write(path, "".join(json.dumps(op) + "\n" for op in ops))
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def write_state(run_dir: str, state: Mapping) -> None:
    atomic_write(os.path.join(run_dir, STATE_FILE), json.dumps(state, indent=1))


def read_state(run_dir: str) -> dict:
    with open(os.path.join(run_dir, STATE_FILE)) as f:
        return json.load(f)


def append_jsonl(path: str | os.PathLike, ops: Iterable[dict], *, after_torn_line: bool = False) -> None:
    """Append ops to a journal, on disk before this returns. ``after_torn_line``: the file ends in a line
    a kill cut short; start on a new line so that the first op is not glued to it."""
    with open(path, "a") as f:
        f.write(("\n" if after_torn_line else "") + "".join(json.dumps(op) + "\n" for op in ops))
        f.flush()
        os.fsync(f.fileno())


def split_params(existing: Mapping[str, str], params: Mapping[str, str]) -> tuple[dict, dict]:
    """(params not logged yet, params logged before with another value): MLflow params are immutable."""
    new = {k: v for k, v in params.items() if k not in existing}
    changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
    return new, changed


def send_op(client, run_id: str, op: dict) -> None:
    """Apply one op other than ``start`` to run ``run_id``. Idempotent: MLflow's store ignores an
    exact duplicate metric (same key/step/timestamp/value), params already logged are skipped."""
    from mlflow.entities import Metric, Param, RunTag

    kind = op["op"]
    if kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, op["ts"], op["step"]) for k, v in op["metrics"].items()])
    elif kind == "params":
        new, changed = split_params(client.get_run(run_id).data.params, op["params"])
        if changed:
            log.warning("tracking: params already logged with other values kept: %s", sorted(changed))
        if new:
            client.log_batch(run_id, params=[Param(k, v) for k, v in new.items()])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
    elif kind == "artifact":
        upload_artifact(client, run_id, op["local_path"], op.get("artifact_path"))
    elif kind == "model":
        from pipeline.tracking.models import log_saved_model

        log_saved_model(client, run_id, op["local_path"], op["name"])
    elif kind == "end":
        client.set_terminated(run_id, op["status"], end_time=op["ts"])
    else:
        log.warning("tracking: unknown buffered op %r ignored", kind)


def stage_copy(run_dir: str, src: str, name: str) -> str:
    """Snapshot the file/folder ``src`` as ``run_dir/tracking_artifacts/buffered/<name>/<basename>``."""
    dst_dir = os.path.join(run_dir, STAGING_DIR, "buffered", name)
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(dst_dir, os.path.basename(src.rstrip(os.sep)))
    if os.path.isdir(src):
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
    return dst


def write_fallback(run_dir: str, intended_uri: str, intended_run_id: str | None, experiment: str,
                   run_name: str | None, params: Mapping[str, str], tags: Mapping[str, str],
                   metric_ops: Iterable[dict], artifact_ops: Iterable[dict], status: str) -> tuple[str, str]:
    """Write a whole run into ``run_dir/mlflow_fallback.db``: params, tags, the metrics of
    ``metric_ops`` and the artifacts of ``artifact_ops`` (journal ops), tagged with the store and
    run it was meant for. Returns (store uri, run id)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    tags = dict(tags)
    tags.update({"tracking.fallback": "true", "tracking.intended_uri": intended_uri,
                 "tracking.intended_run_id": intended_run_id or "none (never created)",
                 "tracking.fallback_note": "all params, tags and metrics of this process; "
                 "only the artifacts that were not uploaded"})
    uri = sqlite_uri(run_dir, FALLBACK_DB)
    ensure_sqlite_store(uri, os.path.join(run_dir, FALLBACK_ARTIFACTS))
    client = MlflowClient(tracking_uri=uri)
    experiment_id = get_or_create_experiment(client, uri, experiment)
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    client.log_batch(run_id, metrics=[Metric(k, v, op["ts"], op["step"])
                                      for op in metric_ops for k, v in op["metrics"].items()])
    for op in artifact_ops:
        try:
            upload_artifact(client, run_id, op["local_path"], op.get("artifact_path"))
        except Exception:
            log.exception("tracking: fallback artifact %s not written", op.get("local_path"))
    client.set_terminated(run_id, status)
    return uri, run_id
