"""The CUDA path: the loader's GPU conversion, AMP + channels-last steps of every method, NCCL /
torchrun with checkpoint -> resume, torch.compile, peak memory. Every test here is marked `gpu` and
skips where no CUDA device is visible (tests/conftest.py); bench/gpu_check.sh runs them, then the
benchmarks, on a GPU machine (docs/benchmarks.md, "The GPU check").

Figures a test measures go to `record_property` (bench/gpu_check.sh copies them from the JUnit XML
into gpu_check.json).
"""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.train.config import REPO_ROOT
from tests import step_checks
from tests.test_train import _wait_for_line, env, tiny_overrides, train_cmd

pytestmark = pytest.mark.gpu


# ----------------------------------------------------------------------------- loader
def _grey_levels(images: torch.Tensor) -> np.ndarray:
    """Normalised float images back to 0..255 grey levels, NCHW, float64, on the host."""
    from ssal_datasets.loader import IMAGENET_MEAN, IMAGENET_STD

    x = images.detach().double().cpu().numpy()
    return x * IMAGENET_STD.reshape(1, 3, 1, 1) + IMAGENET_MEAN.reshape(1, 3, 1, 1)


def _epoch(loader, epoch: int) -> tuple[list, list]:
    loader.set_epoch(epoch)
    images, labels = [], []
    for x, y in loader:
        images.append(x.clone())
        labels.append(y.clone())
    return images, labels


def _make_loader(tiny_demo, split: str, device, channels_last: bool, os_cache: bool):
    from ssal_datasets.loader import create_train_loader, create_val_loader

    common = dict(batch_size=32, num_workers=2, device=device, distributed=False, channels_last=channels_last)
    if split == "train":  # 24 px crops of the 32 px images: a real resize, seeded crops and flips
        return create_train_loader(tiny_demo / "train.beton", resolution=24, seed=3, order="random",
                                   os_cache=os_cache, **common)
    return create_val_loader(tiny_demo / "val.beton", resolution=24, os_cache=os_cache, **common)


@pytest.fixture(scope="module")
def cpu_reference(tiny_demo):
    """The CPU loaders' epoch 1 of each split (NCHW, os_cache on): the reference."""
    reference = {}
    for split in ("train", "val"):
        loader = _make_loader(tiny_demo, split, "cpu", channels_last=False, os_cache=True)
        reference[split] = _epoch(loader, 1)
        loader.close()
    return reference


@pytest.mark.parametrize("os_cache", [True, False], ids=["os_cache", "no_os_cache"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_cuda_loader_matches_the_cpu_loader(tiny_demo, cpu_reference, split, channels_last, os_cache):
    """uint8 NHWC -> ToDevice (non_blocking, side streams) -> channels-last view -> float and
    normalise on the GPU gives the CPU path's images within 1 grey level (the CPU path writes
    float straight from the resampler, the GPU path rounds to uint8 first), same labels."""
    loader = _make_loader(tiny_demo, split, "cuda", channels_last=channels_last, os_cache=os_cache)
    images, labels = _epoch(loader, 1)
    loader.close()
    ref_images, ref_labels = cpu_reference[split]
    assert len(images) == len(ref_images) > 0
    for x, y, ref_x, ref_y in zip(images, labels, ref_images, ref_labels):
        assert x.device.type == "cuda" and y.device.type == "cuda"
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(y.cpu(), ref_y)
        if channels_last:
            assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        else:
            assert x.is_contiguous()
        difference = np.abs(_grey_levels(x) - _grey_levels(ref_x))
        assert difference.max() <= 1.0 + 1e-3, f"max difference {difference.max():.3f} grey levels"


def test_cuda_loader_next_epoch_waits_for_the_last_epoch_still_queued_on_the_gpu(tiny_demo):
    """The kept batch buffers (datasets/epochs.py wait_for_last_epoch): the consumer stream still has
    epoch 0's last batch to convert, queued behind ~0.5 s of GPU work, when epoch 1 starts and its
    producer copies into the same ring slots (FFCV starts an epoch with no events). The converted
    batch must be epoch 0's, as a fully synchronised pass gives it."""
    loader = _make_loader(tiny_demo, "train", "cuda", channels_last=True, os_cache=True)
    reference = [(x.clone(), y.clone()) for x, y in loader]  # epoch 0, each batch converted before the next
    torch.cuda.synchronize()
    loader.set_epoch(0)
    it = iter(loader)
    for _ in range(len(reference) - 1):
        next(it)
    torch.cuda._sleep(1_000_000_000)  # 10^9 GPU cycles: ~0.5 s at an H100's ~2 GHz
    last_images, last_labels = next(it)  # its conversion reads its ring slot after the sleep
    taken = [batch for batch, _ in zip(iter(loader), range(len(reference)))]  # epoch 1 fills the ring
    torch.cuda.synchronize()
    loader.close()
    assert len(taken) == len(reference)
    assert torch.equal(last_labels, reference[-1][1]) and torch.equal(last_images, reference[-1][0])


# ----------------------------------------------------------------------------- one step of every method
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("case", list(step_checks.CASES))
def test_cuda_step_every_method(case, amp):
    """CUDA autocast (bf16; fp16 through the CUDA GradScaler) + channels-last: the checks of
    tests/step_checks.py (finite loss, float32 loss inputs, gradients, channels-last at every conv)."""
    reason = step_checks.missing_reason(case)
    if reason:
        pytest.skip(reason)
    report = step_checks.check_training_step(case, device="cuda", amp=amp, channels_last=True, resolution=64,
                                             batch=8, max_steps=12)
    assert report.conv_count > 0


# ----------------------------------------------------------------------------- NCCL, torchrun, resume
def _torchrun(nproc: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "pipeline.train", *args]


@pytest.mark.parametrize("nproc", [1, 2])
def test_torchrun_demo_config_two_epochs_checkpoint_and_resume(tiny_demo, tmp_path, nproc):
    """configs/demo.yaml under torchrun on the GPU(s) (fp16 through the GradScaler, channels-last),
    2 epochs: stopped mid-epoch by SIGUSR2 (checkpoint), resumed with --resume auto to the end, in
    the same MLflow run. One process runs without a process group (world size 1); two processes
    (bench/gpu_check.sh --gpus 2) use NCCL, DDP and the loaders' distributed=True path."""
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs, {torch.cuda.device_count()} visible (bench/gpu_check.sh --gpus {nproc})")
    overrides = ["--config", str(REPO_ROOT / "configs" / "demo.yaml"),
                 *tiny_overrides(tiny_demo, tmp_path, **{"train.max_steps_per_epoch": 6, "data.batch_size": 8,
                                                         "train.amp": "fp16", "train.log_every": 1})]
    proc = subprocess.Popen(_torchrun(nproc, *overrides), cwd=REPO_ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_line(proc, "epoch 1/2 step 1/6", timeout=300)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == nproc, workers
        for worker in workers:  # SLURM's pre-end signal goes to every task
            os.kill(int(worker), signal.SIGUSR2)
        rest = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert "checkpoint saved" in rest, rest[-3000:]
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    stopped_at = (state["epoch"], state["step_in_epoch"])
    assert stopped_at < (2, 0), stopped_at  # stopped before the end
    assert state["training"]["scaler"] is not None  # the GradScaler's state is in the checkpoint

    result = subprocess.run(_torchrun(nproc, "--resume", "auto", *overrides), cwd=REPO_ROOT, env=env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "resumed from" in result.stdout and "device cuda" in result.stdout
    final = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert (final["epoch"], final["step_in_epoch"]) == (2, 0)
    changed = [k for k, v in final["model"].items() if v.is_floating_point() and not torch.equal(v, state["model"][k])]
    assert changed, "the resumed run did not train"
    assert all(torch.isfinite(v).all() for v in final["model"].values() if v.is_floating_point())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("engine-test").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["world_size"] == str(nproc)
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val/top1/main")) == [1, 2]
    peaks = {phase: [m.value for m in client.get_metric_history(runs[0].info.run_id, f"{phase}/peak_gpu_memory_gib")]
             for phase in ("train", "val")}
    assert all(len(values) == 2 and min(values) > 0 for values in peaks.values()), peaks  # each phase, each epoch
    assert runs[0].data.metrics["val/samples"] == 16 * 4  # every val image once, over all ranks


def test_nccl_one_rank_process_group_ddp_step():
    """NCCL itself on one GPU (a world-size-1 torchrun run has no process group): init, DDP
    forward/backward (gradient all-reduce), an explicit all_reduce, teardown."""
    import torch.distributed as dist

    from tests.conftest import free_port

    device = torch.device("cuda", 0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=device)
    try:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                    torch.nn.LazyLinear(4)).to(device)
        model(torch.randn(2, 3, 8, 8, device=device))  # materialise the lazy layer before DDP
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
        ddp(torch.randn(2, 3, 8, 8, device=device)).square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        value = torch.full((3,), 2.0, device=device)
        dist.all_reduce(value)
        assert value.tolist() == [2.0, 2.0, 2.0]
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- torch.compile
def test_compile_trains_five_steps_baseline_ssal_dks(tiny_demo, tmp_path):
    """train.compile=true: the compiled model trains 5 steps (bf16, channels-last) for baseline,
    SSAL and DKS; the three runs compile in parallel (compilation is CPU-bound)."""
    procs = {}
    for method in ("baseline", "ssal", "dks"):
        work = tmp_path / method
        overrides = tiny_overrides(tiny_demo, work, **{"method.name": method, "train.compile": "true",
                                                       "schedule.epochs": 1, "train.max_steps_per_epoch": 5,
                                                       "tracking.enabled": "false"})
        procs[method] = subprocess.Popen(train_cmd(*overrides), cwd=REPO_ROOT, env=env(), stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
    outputs = {method: proc.communicate(timeout=600)[0] for method, proc in procs.items()}
    for method, proc in procs.items():
        assert proc.returncode == 0, f"{method}:\n{outputs[method][-3000:]}"
        assert "step 5/5" in outputs[method] and "device cuda" in outputs[method], outputs[method][-2000:]


# ----------------------------------------------------------------------------- peak memory
def test_peak_memory_resnet50_ssal3_batch256_bf16(record_property):
    """Peak memory of one training step of ResNet-50 SSAL x3 (1000 classes, groups 200/334/500) at
    batch 256, 224 px, bf16, channels-last (bench/gpu_memory.py measures it, with the baseline's
    alongside): it must fit the card; the figures are reported."""
    from bench.gpu_memory import measure_step

    ssal = measure_step("resnet50", "ssal", batch=256, resolution=224, amp="bf16", steps=3, warmup=1)
    baseline = measure_step("resnet50", "baseline", batch=256, resolution=224, amp="bf16", steps=3, warmup=1)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    record_property("rn50_ssal3_b256_bf16_peak_gib", round(ssal["peak_gib"], 3))
    record_property("rn50_baseline_b256_bf16_peak_gib", round(baseline["peak_gib"], 3))
    record_property("rn50_ssal3_over_baseline_peak", round(ssal["peak_gib"] / baseline["peak_gib"], 3))
    print(f"peak memory RN50 b256 bf16 224px: SSAL x3 {ssal['peak_gib']:.2f} GiB, baseline "
          f"{baseline['peak_gib']:.2f} GiB (card {total:.0f} GiB)")
    assert 0 < baseline["peak_gib"] < ssal["peak_gib"] < total
