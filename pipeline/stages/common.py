"""What the stage tools (groups, fit_lc, explain, report) share.

* :func:`add_tracking_options`: their MLflow options (``--tracking-uri``, ``--runs-root``,
  ``--experiment``, ``--run-name``, ``--tag``, ``--no-mlflow``), defined once.
* :class:`ToolError` and :func:`run_cli`: a usage / input problem is one line ``error: ...``, exit 2.
* :func:`scratch_dir`: a temporary folder for downloaded run files, removed when the tool ends (also
  on an error); :func:`kept_output_dir` for outputs that have no run folder to go to.
* :func:`store_uri`, :func:`resolve_run`, :func:`load_trained`, :func:`run_dataset`: the tracking store, the
  trained run a tool works on, its model and its dataset (they live here, not in :mod:`pipeline.tracking`:
  they resolve paths as the training config does and build the model with :mod:`pipeline.train.factory`).
* :func:`log_stage_run`: the tool's own MLflow run (params, tags, metrics, artifacts), ended and
  printed, through the engine's outage-tolerant :class:`pipeline.tracking.tracker.Tracker`.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.tracking import credentials, runs, store
from pipeline.tracking.constants import RUN_ID_FILE
from pipeline.train import config as config_lib
from pipeline.train.exit_codes import EXIT_USAGE


#: The store every tool uses when neither --tracking-uri nor $MLFLOW_TRACKING_URI is given.
DEFAULT_STORE_PHRASE = f"sqlite:///<runs-root>/{store.DEFAULT_DB}"
# The last lines of every stage tool's --help: where its docs page is.
DOCS_EPILOG = "\n\nmore: docs/studies.md (studies, groupings, +LC, CAMs, the report)"


class ToolError(Exception):
    """A usage / input problem of a stage tool: printed as one line ``error: ...``, exit 2."""


def run_cli(build_parser, run, argv=None, also_usage_errors: tuple = ()) -> int:
    """The `main` of every stage tool: parse, run, and turn a usage error (a :class:`ToolError`, a run
    not found in the store, or one of ``also_usage_errors``) into one line + exit 2."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
        return 0
    except (ToolError, runs.RunLookupError, credentials.CredentialsError, *also_usage_errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


def add_tracking_options(parser: argparse.ArgumentParser, logged_run: str, experiment_default: str,
                         run_name_default: str = "", run_name_help: str = "", no_mlflow_help: str = ""):
    """The MLflow option group of a tool whose own run is ``logged_run`` (e.g. "the groups run")."""
    group = parser.add_argument_group("MLflow")
    group.add_argument("--tracking-uri", help=f"default: $MLFLOW_TRACKING_URI or {DEFAULT_STORE_PHRASE}")
    group.add_argument("--runs-root", default="runs", help="runs root of the default store (default: %(default)s)")
    group.add_argument("--experiment", help=f"experiment of {logged_run} (default: {experiment_default})")
    group.add_argument("--run-name", default=run_name_default,
                       help=f"name of {logged_run} (default: {run_name_help or '%(default)s'})")
    group.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                       help=f"tag of {logged_run} (repeatable), e.g. --tag study=demo --tag stage=NAME")
    group.add_argument("--no-mlflow", action="store_true", help=no_mlflow_help or "log nothing to MLflow")
    return group


def parse_tags(items) -> dict[str, str]:
    tags = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ToolError(f"--tag {item!r}: expected KEY=VALUE")
        tags[key.strip()] = value
    return tags


# ----------------------------------------------------------------------------- folders


def scratch_dir(tool: str) -> tempfile.TemporaryDirectory:
    """``with scratch_dir("groups") as tmp:`` a ``groups-*`` folder in the temp dir, removed on exit."""
    return tempfile.TemporaryDirectory(prefix=f"{tool}-")


def kept_output_dir(what: str) -> Path:
    """A new ``<what>-*`` folder in the temp dir that stays after the tool ends: where a tool's outputs
    go when it has neither ``--out`` nor a run folder (the tool prints the path)."""
    return Path(tempfile.mkdtemp(prefix=f"{what}-"))


# ----------------------------------------------------------------------------- the source run


def store_uri(uri: str | None, runs_root: str | None) -> str:
    """The tracking store a tool uses: --tracking-uri, else $MLFLOW_TRACKING_URI, else the SQLite store
    under --runs-root (relative to the repository root, as in the training config). A URI with credentials in
    it, or a server that refuses the environment's credentials: :class:`credentials.CredentialsError`."""
    resolved = runs.resolve_uri(uri, config_lib.resolve_path(runs_root or "runs"))
    credentials.check_server_accepts(resolved)
    return resolved


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
        mlflow_client = runs.client(store_uri(uri, runs_root))
        run = runs.get_run(mlflow_client, run_id)
        folder = runs.run_dir_of(run)
    elif (folder / RUN_ID_FILE).is_file():
        mlflow_client = runs.client(store_uri(uri, runs_root))
        try:
            run = runs.get_run(mlflow_client, runs.run_id_from_dir(folder))
        except runs.RunLookupError as err:  # the folder is enough; the new run just has no source link
            print(f"warning: {err}; going on with the files in {folder}", file=sys.stderr)
    return mlflow_client, run, folder


def source_experiment(mlflow_client, run, fallback: str) -> str:
    """The experiment of the source run (where a tool logs its own run by default), else ``fallback``."""
    return mlflow_client.get_experiment(run.info.experiment_id).name if run is not None else fallback


def source_tags(run, inherited: Iterable[str]) -> dict[str, str]:
    """``source_run`` and the ``inherited`` tags the source run has (none without a source run)."""
    if run is None:
        return {}
    return {"source_run": run.info.run_id, **{t: run.data.tags[t] for t in inherited if t in run.data.tags}}


def run_dataset(cfg, fix: str) -> tuple[Path, dict]:
    """(data root, manifest) of a run's dataset; a root that is not readable here is a ToolError ending in
    ``fix`` (what the user can do instead)."""
    from ssal_datasets.manifest import read_manifest

    root = config_lib.resolve_path(cfg.data.root)
    try:
        return root, read_manifest(root)
    except Exception as err:  # noqa: BLE001 - any unreadable root is the same one line
        raise ToolError(f"the run's dataset {root} is not readable here ({err}); {fix}") from None


def load_trained(mlflow_client, run, folder: Path | None, tmp: str | Path, weights: str = "final_weights.pt"):
    """(cfg, model in eval mode on CPU, class names, groupings or None) of a finished training run.

    Files come from the run folder when present, else from the run's MLflow artifacts (downloaded to
    ``tmp``). The groupings are read from the weights (SSAL / GapCat keep them as buffers), so no
    groups file is needed."""
    import numpy as np
    import torch
    import yaml

    def fetch(name: str) -> Path:
        if folder is not None and (folder / name).is_file():
            return folder / name
        path = runs.run_file(mlflow_client, run, name, tmp) if run is not None else None
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
    from pipeline.train.factory import build_model, label_space

    try:
        _, manifest = run_dataset(cfg, "")
        num_classes, names, _ = label_space(cfg, manifest)  # data.labels=superclass: the super-classes
    except Exception:  # noqa: BLE001 (dataset not on this machine: sizes from the weights)
        num_classes = int(state["backbone.fc.weight"].shape[0])
        names = [str(i) for i in range(num_classes)]
    try:
        model = build_model(cfg, num_classes, groupings)
        model.load_state_dict(state)
    except (config_lib.ConfigError, RuntimeError) as err:
        raise ToolError(f"the run's weights do not fit its config ({str(err).splitlines()[0][:300]})") from None
    return cfg, model.eval(), names, groupings


# ----------------------------------------------------------------------------- the tool's own run


def log_stage_run(uri: str, experiment: str, journal_dir: str | Path, run_name: str, *,
                  params: Mapping[str, Any], tags: Mapping[str, Any], metrics: Mapping[str, float] | None = None,
                  step: int = 0, artifacts: Iterable[str | Path] = (), label: str = "run") -> str | None:
    """Log the tool's own MLflow run (``journal_dir``: the Tracker's outage journal), end it, print
    ``MLflow: <label> <id> in experiment '<experiment>': <where to view it>`` (the Model-training view's link,
    as every link the project prints) and return the run id."""
    from pipeline.tracking.tracker import Tracker

    tracker = Tracker(uri=uri, experiment=experiment, run_dir=str(journal_dir))
    tracker.start(run_name=run_name, params=dict(params), tags=dict(tags))
    try:
        if metrics:
            tracker.log_metrics(dict(metrics), step=step)
        for path in artifacts:
            tracker.log_artifact(str(path))
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")
    print(f"MLflow: {label} {tracker.run_id} in experiment '{experiment}': {tracker.run_url}")
    return tracker.run_id
