"""The trained model as an MLflow model (``mlflow.pytorch`` flavour), saved in the run folder.

:func:`save_mlflow_model` writes ``RUN_DIR/mlflow_model``: the module itself (a CPU copy in eval mode, wrapped in
:class:`ssal_models.serving.PredictionRules`: one tensor of every prediction rule), an
input example and a signature at the run's evaluation resolution, and in its metadata how to get each of the
method's predictions from the outputs (``model.method.predict``, the rules logged as ``val/top1/<rule>``), the
input's normalisation and the class names. The tracker then logs that folder as the run's model ``model``
(:meth:`pipeline.tracking.tracker.Tracker.log_model`), so ``mlflow.pytorch.load_model("runs:/<id>/model")``
returns it; the folder itself loads the same way while the server is away.

The module is pickled, and its classes live in ``ssal_models``: the package is copied into the model
(``code_paths``), which MLflow puts first on ``sys.path`` when it loads, so the model loads where this
repository is not installed (``ssal_models`` is pure model code and needs torch alone).
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ssal_datasets.decoders import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["MODEL_DIR", "MODEL_NAME", "RULES", "save_mlflow_model"]

MODEL_DIR = "mlflow_model"  # in the run folder
MODEL_NAME = "model"        # the run's logged model: runs:/<run_id>/model

#: What each prediction rule is (the methods' ``predict``; /work/shared/METHODS.md has the full rules).
RULES = {
    "main": "argmax of outputs['main'] (the main head's logits)",
    "joint": "SSAL: main head and branch scores combined (model.method.joint_scores)",
    "lc": "SSAL+LC: the linear combination head on the branches' features",
    "ensemble": "DKS: mean of the classifiers' probabilities",
    "aux_sum": "MAXL: the auxiliary head's probabilities summed over each class's auxiliary set",
}


def _rules_text(rules: Sequence[str]) -> dict[str, str]:
    return {rule: RULES.get(rule, "see model.method.predict") for rule in rules}


def save_mlflow_model(model: nn.Module, run_dir: Path, *, resolution: int, method: str,
                      class_names: Sequence[str]) -> Path:
    """Write ``run_dir/mlflow_model`` (replacing an earlier one) and return its path."""
    import mlflow
    import mlflow.pytorch
    import numpy
    import torchvision
    from mlflow.models import infer_signature

    import ssal_models
    from ssal_models.serving import PredictionRules

    serving = PredictionRules(copy.deepcopy(model).cpu().eval())
    example = torch.zeros(2, 3, resolution, resolution)
    with torch.no_grad():
        output = serving(example)
    metadata = {
        "method": method,
        "input": f"float32 N x 3 x {resolution} x {resolution} RGB, normalised: (pixel - mean) / std on the "
                 f"0-255 scale, mean {[round(v, 3) for v in IMAGENET_MEAN.tolist()]}, "
                 f"std {[round(v, 3) for v in IMAGENET_STD.tolist()]} (what the FFCV val loader gives)",
        "output": f"float32 N x {len(serving.rules)} x {len(class_names)}: log-probabilities of each prediction "
                  f"rule, in the order of prediction_rules; the class is output[:, r].argmax(1); rule 0, 'main', is "
                  f"what the run logged as val/top1/main",
        "prediction_rules": _rules_text(serving.rules),
        "class_names": list(class_names),
    }
    path = Path(run_dir) / MODEL_DIR
    partial = path.with_name(path.name + ".partial")
    for stale in (partial, path):  # mlflow refuses to save into an existing folder
        shutil.rmtree(stale, ignore_errors=True)
    # pickle, not MLflow 3's default torch.export (pt2): any method's model saves the same way, and loads as
    # itself; its classes come with it (code_paths); the requirements are given, not inferred by loading
    # the model in a subprocess
    mlflow.pytorch.save_model(
        serving, str(partial), serialization_format="pickle", code_paths=[str(Path(ssal_models.__file__).parent)],
        signature=infer_signature(example.numpy(), output.numpy()), input_example=example.numpy(), metadata=metadata,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}",
                          f"numpy=={numpy.__version__}", f"mlflow=={mlflow.__version__}"])
    partial.rename(path)
    return path
