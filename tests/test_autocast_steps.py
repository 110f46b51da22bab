"""The engine's AMP code on CPU: one optimisation step of every method under CPU autocast, with
channels-last, through the same training classes and checks as the GPU tests
(tests/step_checks.py; `pytest -k autocast` selects these).

Where the CUDA path differs (tests/test_gpu.py runs it where a GPU is visible): autocast's op
lists (which ops run in low precision / float32) are the CUDA ones there, the GradScaler is the
CUDA one, and the loader's batches arrive by non_blocking copies on side streams (not involved
here: these steps read tensors made in the test). The worker (python -m pipeline.train) runs CPU jobs in
float32 (train.amp and train.channels_last apply on GPU only); these tests call the engine
directly to reach the AMP branches.
"""
import pytest
import torch

from tests import step_checks

CASES = list(step_checks.CASES)


def _skip_if_missing(case):
    reason = step_checks.missing_reason(case)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("case", CASES)
def test_autocast_bf16_channels_last_step(case):
    """bf16 autocast + channels-last: finite loss, bf16 heads widened to float32 for the loss,
    a finite gradient for every stepped parameter (non-zero per component), every conv fed
    channels-last. On CUDA the same step also runs under CUDA's autocast op lists."""
    _skip_if_missing(case)
    report = step_checks.check_training_step(case, device="cpu", amp="bf16", channels_last=True)
    assert report.conv_count > 0 and report.loss_calls > 0


@pytest.mark.parametrize("case", ["baseline", "ssal", pytest.param("dks", marks=pytest.mark.slow),
                                  pytest.param("maxl_first", marks=pytest.mark.slow),
                                  pytest.param("maxl_second", marks=pytest.mark.slow)])
def test_autocast_fp16_grad_scaler_step(case):
    """fp16 autocast through the engine's GradScaler (the CPU one here, the CUDA one on a GPU: the
    same scale / unscale / skip-on-inf logic): the first steps overflow at the initial scale 2^16 and
    are skipped until the scale is low enough, then every optimiser steps. MAXL's meta step runs with
    the scaler's scale (the second-order one used to overflow at any usual scale: s^2 in its double
    backward). One method of each branch kind, 16 px: CPU fp16 convolutions are slow."""
    _skip_if_missing(case)
    report = step_checks.check_training_step(case, device="cpu", amp="fp16", channels_last=True, resolution=16,
                                             max_steps=10)
    assert len(report.losses) > 1  # at least one skipped step: the scaler's skip path ran too


def test_autocast_off_keeps_float32_and_channels_last_reaches_every_conv():
    """amp none (what a CPU run of python -m pipeline.train uses) with channels-last: float32 heads, and
    the conv hooks still see channels-last inputs everywhere (SSAL: the heads' concatenations)."""
    report = step_checks.check_training_step("ssal", device="cpu", amp="none", channels_last=True)
    assert set(report.head_dtypes.values()) == {torch.float32}


def test_autocast_checks_catch_a_dropped_channels_last_and_a_narrow_loss_input():
    """The checks are not vacuous: a branch that turns its input back to NCHW (``.contiguous()``)
    and a loss that feeds the bf16 logits to cross-entropy unwidened are both reported."""
    def drop_channels_last(model):
        reduce = model.branches[0].reduce
        forward = reduce.forward
        reduce.forward = lambda x: forward(x.contiguous())

    with pytest.raises(AssertionError, match="reduce.0 got an input that is not channels-last"):
        step_checks.check_training_step("ssal", device="cpu", amp="bf16", channels_last=True,
                                        prepare=drop_channels_last)

    def narrow_loss(model):
        def loss(outputs, targets):
            ce = torch.nn.functional.cross_entropy(outputs["main"], targets)
            return ce, {"ce/main": ce.detach()}
        model.method.loss = loss

    with pytest.raises(AssertionError, match=r"low-precision head outputs: \['cross_entropy\(torch.bfloat16\)'\]"):
        step_checks.check_training_step("baseline", device="cpu", amp="bf16", channels_last=True,
                                        prepare=narrow_loss)
