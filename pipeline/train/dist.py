"""Distributed set-up shared by every launch mode (one process, torchrun, SLURM tasks).

`init_distributed_mode` reads torchrun's variables first (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), else SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
SLURM_JOB_NODELIST), else runs as a single process without a process group. `raise_if_any_rank` ends
every rank at once on a problem that one rank found.
"""
from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.train.config import ConfigError

from ssal_datasets.cpus import usable_cpus


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""  # "" = no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True, timeout=30).stdout.split()
        return hosts[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0]  # a single node, or scontrol missing: best effort


def env_rank_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or SLURM's variables; (0, 1, 0) if neither."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed_mode(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Initialise torch.distributed when launched with several processes; pick the device.

    Backend: NCCL when the process drives a GPU, gloo otherwise. Under SLURM, MASTER_ADDR is the
    first host of the job and MASTER_PORT derives from the job id, unless already exported
    (e.g. by submitit's TorchDistributedEnvironment).
    """
    rank, world_size, local_rank = env_rank_info()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    info = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)
    if world_size == 1:
        return info
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _slurm_master_addr()
    if "MASTER_PORT" not in os.environ:
        job_id = int(os.environ.get("SLURM_JOB_ID", "0"))
        os.environ["MASTER_PORT"] = str(20000 + job_id % 20000)
    info.backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=info.backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=dev if use_cuda else None)
    return info


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no-op without a process group); returns the tensor."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_bn_statistics(*models: torch.nn.Module) -> None:
    """Make every rank's BatchNorm running statistics of ``models`` the mean over ranks (in place, one
    all-reduce per dtype for all of them; no-op without a process group), so that evaluation and every
    checkpoint see the same model on every rank (timm's `distribute_bn`, reduce mode).

    Mean, not a broadcast of rank 0's: the statistics then come from every rank's images, not 1/world of
    them. They are exponential averages, linear in the batch statistics, so averaging once before they are
    read gives the values that averaging after every step gives (up to rounding); the trainer does the
    former, or the latter in deterministic mode (Trainer.average_bn_statistics). DDP's per-forward buffer
    broadcast is off (the trainer's broadcast_buffers=False)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    buffers = [buffer for model in models for module in model.modules()
               if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.track_running_stats
               for buffer in (module.running_mean, module.running_var) if buffer is not None]
    world_size = dist.get_world_size()

    def mean_over_ranks(flat: torch.Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size

    _in_flat_messages(buffers, mean_over_ranks)


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Broadcast tensors from rank ``src`` in place, one flat message per dtype (no-op without a
    process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2 or not tensors:
        return
    _in_flat_messages(tensors, lambda flat: dist.broadcast(flat, src))


def _in_flat_messages(tensors: list[torch.Tensor], collective) -> None:
    """Run the in-place ``collective`` on one flat tensor per dtype (one message each, not one per
    tensor) and copy the result back into ``tensors``."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = torch.cat([tensor.detach().reshape(-1) for tensor in group])
        collective(flat)
        pieces = flat.split([tensor.numel() for tensor in group])
        with torch.no_grad():  # one kernel launch for all of them (hundreds of BN buffers), not one copy_ each
            torch._foreach_copy_(group, [piece.view_as(tensor) for piece, tensor in zip(pieces, group)])


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cpus_per_rank() -> int:
    """The CPUs this rank's threads may use: SLURM's cpus_per_task where SLURM placed the task (its affinity mask
    holds them, or the whole node when SLURM does not bind), else this process's CPUs shared by the node's ranks."""
    cpus = usable_cpus()
    per_task = os.environ.get("SLURM_CPUS_PER_TASK")
    if per_task:
        return max(1, min(cpus, int(per_task)))
    return max(1, cpus // max(1, local_world_size()))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)


class AgreedConfigError(ConfigError):
    """A ConfigError that every rank raises together (see :func:`raise_if_any_rank`); rank 0 alone prints it."""


def raise_if_any_rank(info: DistInfo, message: str | None) -> None:
    """Each rank passes its own problem (or None); if any rank has one, every rank raises the first one.
    A check that may fail on one rank only (its node's copy of the data, the lock rank 0 takes) thus ends
    all ranks at once, with one line instead of one per rank or a rank left waiting in a collective."""
    messages = [message]
    if info.distributed:
        messages = [None] * info.world_size
        dist.all_gather_object(messages, message)
    for rank, text in enumerate(messages):
        if text:
            raise AgreedConfigError(text if rank == 0 else f"rank {rank}: {text}")
