"""Trained models in MLflow: a saved model logged to its run, and the Model Registry.

* :func:`log_saved_model`: an MLflow model saved in a run folder (``mlflow.pytorch.save_model``) logged as
  the run's model ``name``, so ``runs:/<run_id>/<name>`` loads it. Idempotent: a run that has a model of that
  name already is left as it is (a replay of the journal after an ambiguous failure logs it once).
* :func:`register_best`: the models of a study's runs registered under one name, alias ``best`` on the
  version with the highest metric.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterable

from pipeline.tracking.store import DEFAULT_UI

log = logging.getLogger(__name__)

__all__ = ["BEST_ALIAS", "log_saved_model", "run_model", "register_best", "registry_link"]

BEST_ALIAS = "best"


@contextlib.contextmanager
def _fluent_target(uri: str, experiment_id: str | None = None):
    """``mlflow.<flavour>.log_model`` logs through MLflow's global tracking URI and experiment (its ``run_id``
    does not choose the experiment), and a model version's ``models:/m-<id>`` source is looked up in the global
    store: point both at ours for the call, then restore them."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    old = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if experiment_id is not None:
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = old


def run_model(client, run_id: str, name: str):
    """The logged model ``name`` of run ``run_id`` whose upload finished (the newest one), or None."""
    from mlflow.entities import LoggedModelStatus

    run = client.get_run(run_id)
    found = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
                                        order_by=[{"field_name": "creation_timestamp", "ascending": False}])
    return next((model for model in found if model.status == LoggedModelStatus.READY), None)


def log_saved_model(client, run_id: str, local_path: str, name: str) -> str:
    """Log the ``mlflow.pytorch`` model pickled at ``local_path`` (``serialization_format="pickle"``) as run
    ``run_id``'s model ``name``, with the saved signature, input example, metadata, code and requirements;
    returns the model id."""
    import mlflow.pytorch
    from mlflow.models import Model

    existing = run_model(client, run_id, name)
    if existing is not None:
        return existing.model_id
    saved = Model.load(local_path)
    code = os.path.join(local_path, saved.flavors["python_function"].get("code") or "code")
    code_paths = [os.path.join(code, entry) for entry in sorted(os.listdir(code))] if os.path.isdir(code) else None
    # the load puts the model's copy of ssal_models first on the search path: the trainer has imported its own
    # already, and a `sync` process imports the copy, the same code
    module = mlflow.pytorch.load_model(local_path)
    with _fluent_target(client.tracking_uri, client.get_run(run_id).info.experiment_id):
        info = mlflow.pytorch.log_model(module, name=name, run_id=run_id, signature=saved.signature,
                                        input_example=saved.load_input_example(local_path),
                                        metadata=saved.metadata, code_paths=code_paths,
                                        serialization_format="pickle",  # as saved: the module loads as itself
                                        pip_requirements=os.path.join(local_path, "requirements.txt"))
    return info.model_id


def register_best(client, model_name: str, candidates: Iterable[tuple[str, float | None]],
                  artifact: str = "model", alias: str = BEST_ALIAS) -> dict[str, str]:
    """Register the model ``artifact`` of each run of ``candidates`` ((run id, metric)) under ``model_name``
    (a run registered before keeps its version) and set ``alias`` on the version with the highest metric.
    Returns {run id: version} of every version of ``model_name``; runs without a logged model are skipped
    (and a name none of them has is not created)."""
    registered: dict[str, str] | None = None
    best: tuple[float, str] | None = None
    for run_id, metric in candidates:
        model = run_model(client, run_id, artifact)
        if model is None:
            continue
        if registered is None:
            with contextlib.suppress(Exception):  # exists already (or another process made it just now)
                client.create_registered_model(model_name, description=f"alias '{alias}': the highest val/top1/main")
            registered = {v.run_id: v.version for v in client.search_model_versions(f"name = '{model_name}'")}
        if run_id not in registered:
            with _fluent_target(client.tracking_uri):
                registered[run_id] = client.create_model_version(model_name, source=f"models:/{model.model_id}",
                                                                 run_id=run_id, model_id=model.model_id).version
        if metric is not None and (best is None or metric > best[0]):
            best = (metric, registered[run_id])
    if best is not None:
        client.set_registered_model_alias(model_name, alias, best[1])
    return {run_id: str(version) for run_id, version in (registered or {}).items()}


def registry_link(uri: str, model_name: str) -> str:
    """How a user opens the registered model ``model_name`` of the store at ``uri`` in MLflow's UI."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/models/{model_name}"
    return f"mlflow ui --backend-store-uri {uri}  then open {DEFAULT_UI}/#/models/{model_name}"
