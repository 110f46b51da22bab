"""Small MLflow helpers shared by the study tools (groups, fit_lc, report, explain, study).

* :func:`resolve_uri`: ``--tracking-uri`` or ``$MLFLOW_TRACKING_URI`` or the engine's default
  SQLite store ``<runs_root>/mlflow.db`` (schema created safely).
* :func:`client`, :func:`get_run`: an ``MlflowClient`` and a run, with one-line errors.
* :func:`run_file`: a file of a finished run, from its run folder (tag ``tracking.run_dir``,
  written by the engine's Tracker) when it is reachable, else downloaded from its artifacts.
* :func:`study_runs`: every run tagged ``study=<id>`` (optionally one ``stage``) in any experiment.
* :func:`aux_tracker`: an MLflow run for a non-training stage, through the engine's outage-tolerant
  :class:`pipeline.tracking.tracker.Tracker`.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping


os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


EXIT_USAGE = 2


class ToolError(Exception):
    """A usage / input problem of a study tool: printed as one line ``error: ...``, exit 2."""


def run_cli(build_parser, run, argv=None, usage_errors: tuple = (ToolError,)) -> int:
    """The `main` of every study tool: parse, run, and turn a usage error into one line + exit 2."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
        return 0
    except usage_errors as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


def resolve_uri(uri: str | None = None, runs_root: str | None = None) -> str:
    from pipeline.tracking import tracker as tracking
    from pipeline.train.config import resolve_path

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        if uri.startswith("sqlite:///"):
            tracking.ensure_sqlite_store(uri)
        return uri
    return tracking.default_tracking_uri(str(resolve_path(runs_root or "runs")))


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def get_run(mlflow_client, run_id: str):
    try:
        return mlflow_client.get_run(run_id)
    except Exception as err:  # noqa: BLE001 (MlflowException, connection errors)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ToolError(f"run {run_id!r} not found in the tracking store {mlflow_client.tracking_uri} ({first[:200]}); "
                        f"pass the right --tracking-uri / --runs-root") from None


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


def run_id_from_dir(run_dir: str | Path) -> str:
    path = Path(run_dir) / "mlflow_run_id"
    if not path.is_file():
        raise ToolError(f"{run_dir}: no mlflow_run_id file (not a finished training run folder); "
                        f"train it first or pass its MLflow run id")
    return path.read_text().strip()


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


def aux_tracker(uri: str, experiment: str, run_dir: str | Path, run_name: str,
                params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None):
    """A started Tracker for a non-training stage (same outage tolerance as training runs)."""
    from pipeline.tracking.tracker import Tracker

    tracker = Tracker(uri=uri, experiment=experiment, run_dir=str(run_dir))
    tracker.start(run_name=run_name, params=dict(params or {}), tags=dict(tags or {}))
    return tracker


def parse_tags(items) -> dict[str, str]:
    tags = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ToolError(f"--tag {item!r}: expected KEY=VALUE")
        tags[key.strip()] = value
    return tags


# ----------------------------------------------------------------------------- trained models


def resolve_run(run_id: str | None, run_dir: str | None, uri: str | None, runs_root: str | None):
    """(mlflow client or None, run or None, local run folder or None) from --run / --run-dir."""
    if bool(run_id) == bool(run_dir):
        raise ToolError("give exactly one of --run RUN_ID or --run-dir DIR")
    folder = None
    if run_dir:
        folder = Path(run_dir)
        if not folder.is_dir():
            raise ToolError(f"--run-dir: no such folder {run_dir}")
        if not (folder / "config.yaml").is_file():
            raise ToolError(f"--run-dir: {run_dir} has no config.yaml (not a training run folder)")
    mlflow_client = run = None
    if run_id:
        mlflow_client = client(resolve_uri(uri, runs_root))
        run = get_run(mlflow_client, run_id)
        folder = run_dir_of(run)
    elif (folder / "mlflow_run_id").is_file():
        mlflow_client = client(resolve_uri(uri, runs_root))
        try:
            run = get_run(mlflow_client, run_id_from_dir(folder))
        except ToolError as err:  # the folder is enough; the new run just has no source link
            print(f"warning: {err}; going on with the files in {folder}", file=sys.stderr)
    return mlflow_client, run, folder


def load_trained(mlflow_client, run, folder: Path | None, tmp: str | Path, weights: str = "final_weights.pt"):
    """(cfg, model in eval mode on CPU, class names, groupings or None) of a finished training run.

    Files come from the run folder when present, else from the run's MLflow artifacts. The groupings
    are read from the weights (SSAL / GapCat keep them as buffers), so no groups file is needed."""
    import numpy as np
    import torch
    import yaml

    from pipeline.train import config as config_lib

    def fetch(name: str) -> Path:
        if folder is not None and (folder / name).is_file():
            return folder / name
        path = run_file(mlflow_client, run, name, tmp) if run is not None else None
        if path is None:
            where = folder if folder is not None else f"run {run.info.run_id}"
            raise ToolError(f"{where}: no {name} (is the run finished? was tracking.log_model off?)")
        return path

    raw = yaml.safe_load(fetch("config.yaml").read_text())
    raw.setdefault("method", {})["groups_file"] = ""  # groupings come from the weights
    try:
        cfg = config_lib.config_from_dict(raw)
    except config_lib.ConfigError as err:
        raise ToolError(f"config.yaml of the run does not load with this code ({err})") from None
    state = torch.load(fetch(weights), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a full checkpoint (last.pt / best.pt)
    buffers = sorted((k for k in state if re.match(r"^method\.class_to_group_\d+$", k)),
                     key=lambda k: int(k.rsplit("_", 1)[1]))
    groupings = [state[k].numpy().astype(np.int64) for k in buffers] or None
    names, num_classes = None, None
    try:
        from ssal_datasets.manifest import read_manifest
        from pipeline.train.config import resolve_path
        from pipeline.train.factory import label_space

        manifest = read_manifest(resolve_path(cfg.data.root))
        num_classes, names, _ = label_space(cfg, manifest)  # data.labels=superclass: the super-classes
    except Exception:  # noqa: BLE001 (dataset not on this machine: sizes from the weights)
        num_classes = int(state["backbone.fc.weight"].shape[0])
        names = [str(i) for i in range(num_classes)]
    from pipeline.train.factory import build_model

    try:
        model = build_model(cfg, num_classes, groupings)
        model.load_state_dict(state)
    except (config_lib.ConfigError, RuntimeError) as err:
        raise ToolError(f"the run's weights do not fit its config ({str(err).splitlines()[0][:300]})") from None
    return cfg, model.eval(), names, groupings
