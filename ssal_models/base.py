"""What every method module provides, and the registry :func:`ssal_models.build_model` reads.

A *method* (``baseline``, ``ssal``, ``gapcat``, ``dks``, ``ds``; later ``maxl``) is registered
with :func:`register_method` as a builder::

    @register_method("name")
    def build(info: BackboneInfo, num_classes: int, options: dict) -> MethodBuild: ...

The builder validates its options (``ValueError`` with :func:`check_options`), creates the
branch modules and the :class:`Method` object, and returns them in a :class:`MethodBuild`.
The model (:class:`ssal_models.model.BranchedResNet`) owns the branches (their parameters
belong to the model), calls each branch on its tap point, and puts the logits in an ordered
dict ``{"main": ..., "<method>.0": ..., ...}``.  The method object is a submodule of the model
holding only buffers (e.g. SSAL's class->group indices) plus, for SSAL, the optional
separately fitted linear-combination head; it owns the loss and the prediction rules.

A new method (MAXL) needs one module with such a builder, imported in
``ssal_models/__init__.py``; nothing else changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import BackboneInfo

Outputs = Mapping[str, torch.Tensor]


class Method(nn.Module):
    """Loss and prediction rules of one method.  Subclasses override what differs.

    * ``loss(outputs, targets) -> (total, parts)``: ``total`` is the weighted scalar to
      back-propagate; ``parts`` are the *unweighted* named terms, detached (for logging).
    * ``predict(outputs) -> {rule: (N, C) float32 log-probabilities}`` (normalised).
    * ``extra_metrics(outputs, targets) -> {name: (N,) bool}`` per-sample correctness of
      metrics that are not C-class rules.
    """

    name: str = "base"

    def __init__(self, num_classes: int, branch_names: Sequence[str] = ()):
        super().__init__()
        self.num_classes = int(num_classes)
        self.branch_names: List[str] = list(branch_names)
        # applied to every cross-entropy against hard (class or group) targets; the training
        # engine sets it from its optimiser config (KL / distillation terms are not smoothed)
        self.label_smoothing = 0.0

    # how the model combines branch outputs with the main head (GapCat overrides)
    concat_branch_features: bool = False

    def extra_outputs(self, images: torch.Tensor, outputs: "Dict[str, torch.Tensor]") -> "Dict[str, torch.Tensor]":
        """Called by the model at the end of its forward; a method that needs outputs computed
        from the images by a network of its own (MAXL's label generator) adds them here."""
        return outputs

    def loss(self, outputs: Outputs, targets: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        ce = cross_entropy(outputs["main"], targets, self.label_smoothing)
        return ce, {"ce/main": ce.detach()}

    def predict(self, outputs: Outputs) -> Dict[str, torch.Tensor]:
        return {"main": log_probs(outputs["main"])}

    def extra_metrics(self, outputs: Outputs, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_classes={self.num_classes}, branches={self.branch_names}"


@dataclass
class BranchSpec:
    """A branch module, the tap point it reads, and the output name it writes."""

    name: str
    tap: str
    module: nn.Module


@dataclass
class MethodBuild:
    method: Method
    branches: List[BranchSpec] = field(default_factory=list)
    # extra input width of the main classifier (GapCat concatenates branch features)
    main_extra_features: int = 0


MethodBuilder = Callable[[BackboneInfo, int, Dict[str, Any]], MethodBuild]
METHODS: Dict[str, MethodBuilder] = {}


def register_method(name: str) -> Callable[[MethodBuilder], MethodBuilder]:
    def decorate(builder: MethodBuilder) -> MethodBuilder:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = builder
        return builder
    return decorate


# ----------------------------------------------------------------------------- option checks


# backbone options that size the network (ssal_models.backbones.backbone_info validates them)
CAPACITY_OPTIONS = ("width_multiplier", "stem_convs", "stem_conv_width")
# the backbone options every method takes (ssal_models.model.build_model reads them)
BACKBONE_OPTIONS = ("blurpool", "zero_init_residual", *CAPACITY_OPTIONS)


def check_options(method: str, options: Mapping[str, Any], valid: Iterable[str]) -> None:
    valid = sorted(set(valid) | set(BACKBONE_OPTIONS))
    for key in options:
        if key not in valid:
            raise ValueError(f"unknown option {key!r} for method {method!r}; valid options: {', '.join(valid)}")


def float_list(method: str, option: str, value: Any, length: int, minimum: float = 0.0) -> List[float]:
    """A sequence of ``length`` finite floats >= minimum (a scalar is broadcast)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * length
    try:
        if isinstance(value, (str, bytes)) or any(isinstance(v, (bool, str, bytes)) for v in value):
            raise TypeError
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{method}: option {option!r} must be a number or a list of {length} numbers, "
                         f"got {value!r}") from None
    if len(values) != length or not all(math.isfinite(v) and v >= minimum for v in values):
        raise ValueError(f"{method}: option {option!r} must be {length} finite numbers >= {minimum}, got {value!r}")
    return values


def positive_float(method: str, option: str, value: Any, allow_zero: bool = False) -> float:
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ValueError(f"{method}: option {option!r} must be a finite number {'>=' if allow_zero else '>'} 0, "
                         f"got {value!r}")
    return number


def stage_list(method: str, info: BackboneInfo, value: Any, allowed_stages: Sequence[str] = ()) -> List[str]:
    """Validated, canonical tap names (``ValueError`` naming the valid ones)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{method}: option 'stages' must be a non-empty list of stage names "
                         f"(e.g. ['layer2', 'layer3']), got {value!r}")
    taps = [info.canonical_tap(v) for v in value]
    if allowed_stages:
        for tap in taps:
            if tap.split(".")[0] not in allowed_stages:
                raise ValueError(f"{method}: stage {tap!r} is not allowed; branches attach in "
                                 f"{', '.join(allowed_stages)}")
    return taps


# ----------------------------------------------------------------------------- numerics


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean CE computed in float32 whatever the autocast dtype (fp16 logits of magnitude 1e4
    stay finite: log-softmax subtracts the max before exponentiating)."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits.float(), dim=1)
