"""One optimisation step of every method through the engine's own training classes, with the
checks the AMP / channels-last path must pass, on any device (the device is a parameter).

Used by the CPU tests (tests/test_autocast_steps.py: CPU autocast, the CPU GradScaler) and the
GPU tests (tests/test_gpu.py: CUDA autocast, the CUDA GradScaler), so both check the same things:

* the loss is finite at every step;
* autocast really ran: every head's output is in the autocast dtype;
* every softmax / cross-entropy / KL of the loss reads float32 (or float64) tensors: the heads'
  low-precision outputs are widened before the loss, not left to autocast's op lists (which
  differ between CPU and CUDA);
* every parameter each optimiser steps has a finite gradient when the optimiser steps, and
  every component (backbone, each branch, MAXL's generator) a non-zero one;
* with channels-last, every ``nn.Conv2d`` of the model (backbone, branches, blur-pool convs,
  MAXL's generator) sees a channels-last input: checked with forward pre-hooks, and every conv
  must have run at least once.

fp16 goes through the GradScaler, whose first steps may find inf gradients and skip the
optimiser (then the scale is lowered): the check runs up to ``max_steps`` steps until every
optimiser has stepped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import ssal_models
from pipeline.train.config import OptimConfig
from pipeline.train.optim import build_optimizer
from pipeline.train.factory import training_class
from ssal_models.grouping import random_grouping

NUM_CLASSES = 10
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# name -> (method, options); SSAL / GapCat with two branches, MAXL with its default generator (ResNet-10)
CASES = {
    "baseline": ("baseline", {}),
    "ssal": ("ssal", {}),
    "ssal_authors": ("ssal", {"head": "authors"}),
    "gapcat": ("gapcat", {}),
    "gapcat_authors": ("gapcat", {"head": "authors"}),
    "dks": ("dks", {}),
    "ds": ("ds", {}),
    "maxl_first": ("maxl", {"psi": 2, "meta_order": "first"}),
    "maxl_second": ("maxl", {"psi": 2, "meta_order": "second"}),
}
# the authors' SSAL heads down-sample by unpadded convs: they need at least 64 px (ssal_models/authors_heads.py)
MIN_RESOLUTION = {"ssal_authors": 64, "gapcat_authors": 64}
# the functions a loss uses to turn head outputs into probabilities / losses
LOSS_FUNCTIONS = {F.cross_entropy, F.log_softmax, F.softmax, F.kl_div, F.nll_loss, torch.log_softmax,
                  torch.softmax, torch.logsumexp, torch.Tensor.log_softmax, torch.Tensor.softmax}


def case_options(case: str) -> tuple[str, dict]:
    method, options = CASES[case]
    options = dict(options)
    if method in ("ssal", "gapcat"):
        options["groupings"] = [random_grouping(NUM_CLASSES, k, seed=i) for i, k in enumerate((2, 5))]
    return method, options


def missing_reason(case: str) -> str | None:
    """Why ``case`` cannot be built in this checkout (an option another change adds), else None."""
    method, options = case_options(case)
    if "head" not in options:
        return None
    try:
        with torch.device("meta"):
            ssal_models.build_model("resnet18", method, NUM_CLASSES, **options)
    except ValueError as err:
        return f"{method} option head=authors is not in this checkout ({err})"
    return None


def build_training(case: str, device: torch.device, amp: str, channels_last: bool, *, arch: str = "resnet18",
                   blurpool: bool = True, grad_clip_norm: float = 5.0):
    """The model of ``case`` on ``device`` and the engine's training object for it (the class
    pipeline/train/factory.py's training_class picks for the method: StandardTraining, MaxlTraining)."""
    method, options = case_options(case)
    torch.manual_seed(0)
    model = ssal_models.build_model(arch, method, NUM_CLASSES, blurpool=blurpool, **options).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cls = training_class(method)
    cls.prepare_model(model)
    optimizer = build_optimizer(model, OptimConfig(), global_batch=256)
    return model, cls(model, model, optimizer, 0.1, device=device, amp=amp, grad_clip_norm=grad_clip_norm,
                      channels_last=channels_last)


class _LossInputDtypes(TorchFunctionMode):
    """Records the dtype of the first tensor argument of every loss-side function call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, torch.dtype]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in LOSS_FUNCTIONS:
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if tensor is not None and tensor.is_floating_point():
                self.calls.append((getattr(func, "__name__", str(func)), tensor.dtype))
        return func(*args, **(kwargs or {}))


@dataclass
class StepReport:
    losses: list = field(default_factory=list)
    optimizer_steps: dict = field(default_factory=dict)
    conv_count: int = 0
    loss_calls: int = 0
    head_dtypes: dict = field(default_factory=dict)


def _component(name: str) -> str:
    """backbone / branches.i / method.<child> (MAXL's generator) of a parameter name."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("branches", "method") else parts[0]


def check_training_step(case: str, *, device, amp: str, channels_last: bool, arch: str = "resnet18",
                        resolution: int = 32, batch: int = 4, max_steps: int = 6, prepare=None) -> StepReport:
    """Build ``case``, run the engine's training step until every optimiser has stepped (at most
    ``max_steps``), and assert the checks of the module docstring. Returns what was seen.
    ``prepare(model)``, if given, may alter the model first (the tests of the checks use it)."""
    device = torch.device(device)
    resolution = max(resolution, MIN_RESOLUTION.get(case, 0))
    model, training = build_training(case, device, amp, channels_last, arch=arch)
    if prepare is not None:
        prepare(model)
    report = StepReport()
    names = {id(p): n for n, p in model.named_parameters()}
    problems: list[str] = []

    def before_step(optimizer_name):
        def hook(optimizer, args, kwargs):
            report.optimizer_steps[optimizer_name] = report.optimizer_steps.get(optimizer_name, 0) + 1
            nonzero: dict[str, bool] = {}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    name = names.get(id(p), "?")
                    if p.grad is None:
                        problems.append(f"{optimizer_name}: {name} has no gradient")
                    elif not torch.isfinite(p.grad).all():
                        problems.append(f"{optimizer_name}: {name} has a non-finite gradient")
                    else:
                        component = _component(name)
                        nonzero[component] = nonzero.get(component, False) or bool(p.grad.abs().sum() > 0)
            problems.extend(f"{optimizer_name}: every gradient of {c} is zero" for c, ok in nonzero.items() if not ok)
        return hook

    handles = [opt.register_step_pre_hook(before_step(n)) for n, opt in training.optimizers.items()]
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    seen_convs: set[str] = set()

    def conv_hook(name):
        def hook(module, inputs):
            seen_convs.add(name)
            if channels_last and not inputs[0].is_contiguous(memory_format=torch.channels_last):
                problems.append(f"conv {name} got an input that is not channels-last "
                                f"(shape {tuple(inputs[0].shape)}, strides {inputs[0].stride()})")
        return hook

    handles += [m.register_forward_pre_hook(conv_hook(n)) for n, m in convs.items()]

    def outputs_hook(module, inputs, outputs):
        report.head_dtypes.update({k: v.dtype for k, v in outputs.items()})

    handles.append(model.register_forward_hook(outputs_hook))
    generator = torch.Generator(device="cpu").manual_seed(1)
    images = torch.randn(batch, 3, resolution, resolution, generator=generator).to(device)
    labels = torch.arange(batch).remainder(NUM_CLASSES).to(device)
    loss_mode = _LossInputDtypes()
    try:
        training.train_model.train()
        training.set_lr_factor(0.2)  # as train_one_epoch does before each step (early in a schedule)
        for _ in range(max_steps):
            x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
            with loss_mode:
                loss, parts = training.step(x, labels)
            report.losses.append(float(loss))
            assert torch.isfinite(loss), f"{case}: non-finite loss {float(loss)} ({ {k: float(v) for k, v in parts.items()} })"
            if set(report.optimizer_steps) == set(training.optimizers):
                break
    finally:
        for handle in handles:
            handle.remove()
    assert set(report.optimizer_steps) == set(training.optimizers), \
        f"{case}: optimisers never stepped in {max_steps} steps: {set(training.optimizers) - set(report.optimizer_steps)}"
    assert not problems, f"{case}: " + "; ".join(problems[:10])
    missing = sorted(set(convs) - seen_convs)
    assert not missing, f"{case}: convs that never ran: {missing[:5]}"
    report.conv_count = len(convs)
    if amp != "none":
        low = AMP_DTYPES[amp]
        wrong = {k: v for k, v in report.head_dtypes.items() if v != low}
        assert not wrong, f"{case}: heads not in {low} under autocast (autocast did not run?): {wrong}"
    wide = (torch.float32, torch.float64)
    narrow = sorted({f"{fn}({dtype})" for fn, dtype in loss_mode.calls if dtype not in wide})
    assert loss_mode.calls, f"{case}: no loss function call was seen"
    assert not narrow, f"{case}: loss functions fed low-precision head outputs: {narrow}"
    report.loss_calls = len(loss_mode.calls)
    return report
