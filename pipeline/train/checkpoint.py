"""Atomic, checksummed checkpoints and RNG state capture.

A checkpoint is written to a temporary file in the same folder (``.<name>.tmp-<pid>``),
flushed to disk, then renamed over the final name: a crash (or kill, or a full disk) during
the save leaves the previous checkpoint intact and loadable. A training checkpoint carries a
sha256 of its content (every tensor's bytes, every other value's repr), checked when it is
loaded: torch's zip reader does not check its CRCs, so a flipped byte inside a tensor would
otherwise load silently. Every failure to write or read one is a :class:`CheckpointError`
whose message is one line naming the file.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import random
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ssal_datasets.files import atomic_link, atomic_write, temporaries_in

LAST = "last.pt"
BEST = "best.pt"
CHECKSUM_KEY = "checksum"


# Tests only: "NAME@N:FLAG" makes this process's N-th save of a file named NAME stop after the
# temporary file is written, before its rename, touch FLAG and wait there to be killed: a
# deterministic "killed during the checkpoint write".
HOLD_SAVE_ENV = "SSAL_TEST_HOLD_SAVE"
_saves_by_name: dict[str, int] = {}


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message is one line naming the file."""


def _hold_if_asked(path: Path) -> None:
    spec = os.environ.get(HOLD_SAVE_ENV)
    if not spec:
        return
    target, flag = spec.split(":", 1)
    name, _, count = target.partition("@")
    if path.name != name:
        return
    _saves_by_name[name] = _saves_by_name.get(name, 0) + 1
    if _saves_by_name[name] == int(count or 1):
        Path(flag).write_text(str(os.getpid()))
        time.sleep(600)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` through :func:`ssal_datasets.files.atomic_write`; a failure is a one-line CheckpointError."""
    try:
        atomic_write(path, lambda handle: torch.save(obj, handle), before_replace=_hold_if_asked)
    except (OSError, RuntimeError) as err:
        path = Path(path)
        if is_disk_full(err):
            raise CheckpointError(f"{path}: not written, no space left on {path.parent}; the previous "
                                  f"{path.name} (if any) is kept: free space, then continue with --resume auto") from None
        raise CheckpointError(f"{path}: not written ({_first_line(err)}); the previous {path.name} "
                              f"(if any) is kept") from None


def save_checkpoint(state: dict[str, Any], path: str | Path, also: Sequence[str | Path] = ()) -> None:
    """Save a training checkpoint atomically, with the checksum of its content; each path in `also` becomes a
    hard link to the same file (best.pt of the epoch that last.pt holds: written once, not twice).

    The state is copied to the CPU once and both hashed and saved from that copy (torch.save would copy every
    device tensor again). A filesystem without hard links gets a second full file instead."""
    cpu_state = to_cpu(state)
    content = {**cpu_state, CHECKSUM_KEY: content_checksum(cpu_state)}
    atomic_torch_save(content, path)
    for other in also:
        try:
            atomic_link(path, other, before_replace=_hold_if_asked)
        except OSError as err:
            if err.errno not in _NO_HARD_LINKS:
                raise CheckpointError(f"{other}: not written ({_first_line(err)}); the previous {Path(other).name} "
                                      f"(if any) is kept") from None
            atomic_torch_save(content, other)


# the errors of a filesystem (or a link count) that takes no more hard links: a full copy will do
_NO_HARD_LINKS = (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK)


def to_cpu(obj: Any) -> Any:
    """`obj` with every tensor on the CPU: containers rebuilt (a state_dict's ``_metadata`` kept), CPU tensors
    detached but not copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        copied = type(obj)((key, to_cpu(value)) for key, value in obj.items())
        if hasattr(obj, "_metadata"):  # load_state_dict reads the modules' versions from it
            copied._metadata = obj._metadata
        return copied
    if isinstance(obj, list):
        return [to_cpu(value) for value in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(to_cpu(value) for value in obj)
    return obj


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint and check its checksum (files written before checksums load unchecked).
    Raises CheckpointError (one line naming the file) for an empty, truncated, garbled or
    tampered file, or one that is not a torch file at all."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file, not a checkpoint")
        # our own files; weights_only=False because they hold RNG states and plain Python objects
        state = torch.load(path, map_location="cpu", weights_only=False)
    except CheckpointError:
        raise
    except Exception as err:  # torch raises EOFError, RuntimeError, UnpicklingError... depending on the damage
        raise CheckpointError(f"{path}: unreadable, truncated or corrupt, or not a checkpoint "
                              f"({type(err).__name__}: {_first_line(err)})") from None
    if isinstance(state, dict) and CHECKSUM_KEY in state:
        expected = state.pop(CHECKSUM_KEY)
        if content_checksum(state) != expected:
            raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt (its content changed "
                                  f"after it was written)")
    return state


TRAINING_KEYS = ("model", "training", "epoch", "step_in_epoch")


def load_training_state(path: str | Path) -> dict[str, Any]:
    """A training checkpoint (last.pt / best.pt) to resume from, or a one-line CheckpointError that
    names the file, and for a damaged last.pt offers an intact best.pt beside it."""
    path = Path(path)
    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"{err}{_intact_alternative(path)}") from None
    if isinstance(state, dict) and all(key in state for key in TRAINING_KEYS):
        return state
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"--resume: {path} holds model weights only (like final_weights.pt), not a training "
                              f"state; resume from a run's {LAST} or {BEST}")
    raise CheckpointError(f"--resume: {path} is not a training checkpoint (no model, optimiser and epoch); "
                          f"resume from a run's {LAST} or {BEST}")


def _intact_alternative(path: Path) -> str:
    best = path.with_name(BEST)
    if path.name != LAST or not best.is_file():
        return ""
    try:
        epoch = load_checkpoint(best).get("epoch")
    except CheckpointError:
        return f"; {best} is damaged too"
    return f"; {best} (epoch {epoch}) is intact: continue from it with --resume {best}"


# what a checkpoint's weights are shaped by: resuming with another value cannot work
ARCHITECTURE_KEYS = ("model.arch", "model.blurpool", "model.width_multiplier", "model.stem_convs",
                     "model.stem_conv_width", "method.name")


def check_resumable(path: Path, state: dict[str, Any], config: dict[str, Any], model_state: dict[str, torch.Tensor],
                    groupings: list[list[int]] | None) -> None:
    """Refuse (one line) to resume `state` into a model of another architecture, method or grouping
    than the flat `config` (``section.key -> value``) builds."""
    fix = f"resume with the run's own config ({path.parent / 'config.yaml'}) or start a new run"
    saved_config = state.get("config") or {}
    for key in ARCHITECTURE_KEYS:
        section, name = key.split(".")
        saved = saved_config.get(section, {}).get(name, config[key])
        if saved != config[key]:
            raise CheckpointError(f"--resume: {path} was trained with {key}={saved}, this config has "
                                  f"{config[key]}; {fix}")
    saved_groups = state.get("groupings")
    if saved_groups is not None and groupings is not None and saved_groups != groupings:
        saved_counts, counts = [max(g) + 1 for g in saved_groups], [max(g) + 1 for g in groupings]
        what = (f"{saved_counts} groups, this config makes {counts}" if saved_counts != counts
                else "other class groupings than this config")
        raise CheckpointError(f"--resume: {path} was trained with {what} (method.num_groups / method.groups_file); "
                              f"{fix}")
    mismatch = describe_state_mismatch(model_state, state["model"])
    if mismatch:
        raise CheckpointError(f"--resume: {path} holds the weights of another model ({mismatch}); {fix}")


def describe_state_mismatch(expected: dict[str, torch.Tensor], got: dict[str, Any]) -> str:
    """'' when `got` has exactly `expected`'s keys and shapes; else a short summary (counts, first keys),
    never torch's full list of missing keys."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    reshaped = [k for k in expected if k in got and tuple(getattr(got[k], "shape", ())) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape, e.g. {k} {list(got[k].shape)} there, "
                     f"{list(expected[k].shape)} here")
    return "; ".join(parts)


def content_checksum(obj: Any) -> str:
    """sha256 of a checkpoint's content: tensors and arrays by dtype, shape and bytes, containers
    in order, other values by repr. The same after a save/load round trip."""
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{tensor.dtype}{tuple(obj.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().data)
    elif isinstance(obj, np.ndarray):
        digest.update(f"A{obj.dtype}{obj.shape}".encode())
        digest.update(np.ascontiguousarray(obj).reshape(-1).view(np.uint8).data)
    elif isinstance(obj, dict):
        digest.update(b"{")
        for key, value in obj.items():
            _feed(digest, key)
            _feed(digest, value)
        digest.update(b"}")
    elif isinstance(obj, (list, tuple)):
        digest.update(b"[" if isinstance(obj, list) else b"(")
        for value in obj:
            _feed(digest, value)
        digest.update(b"]")
    elif isinstance(obj, (set, frozenset)):  # string hashing varies per process: sort
        digest.update(repr(sorted(repr(v) for v in obj)).encode())
    elif isinstance(obj, _PLAIN_VALUES):
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:  # an object whose repr may hold its address: its pickle
        digest.update(pickle.dumps(obj, protocol=4))


_PLAIN_VALUES = (int, float, complex, bool, str, bytes, type(None), np.generic, torch.dtype, torch.device, torch.Size)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``.<name>.tmp-<pid>`` files that saves killed mid-write left in `folder`
    (those of a process still running on this machine are kept). Returns the removed paths."""
    removed = []
    for path, pid in temporaries_in(folder):
        if _process_alive(pid):
            continue
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_disk_full(err: BaseException | None) -> bool:
    """ENOSPC anywhere in the chain (torch wraps the OSError of a failed write in a RuntimeError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _first_line(err: BaseException) -> str:
    """The first sentence of an error's message (torch's go on for lines of advice)."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    return first.split(". ")[0][:200]


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
