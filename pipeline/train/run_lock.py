"""One training per run folder: an exclusive ``flock`` on ``RUN_DIR/run.lock``.

Rank 0 of a training holds it from before the first read of the folder to the end of the process
(``pipeline.train.entry.main``); ``launch.py --local`` probes it before it starts any worker. A second
training of the same folder (the same command twice, ``--resume auto`` while one runs) fails at once
naming the process that holds it. The kernel drops a ``flock`` when its holder dies, even by SIGKILL,
so a killed run never leaves a stale lock behind; the PID written into the file is only for the message.
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = "run.lock"


class RunFolderBusy(Exception):
    """Another process trains in this run folder; the message names the folder and the holder."""


class RunLock:
    """A held lock; ``release()`` (or the process ending) frees it."""

    def __init__(self, fd: int, path: Path):
        self._fd, self.path = fd, path

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def acquire(run_dir: str | os.PathLike) -> RunLock:
    """Lock ``run_dir`` (created if missing) for this process, or raise :class:`RunFolderBusy`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        pid, _, host = holder.partition(" ")
        where = f"PID {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")
        raise RunFolderBusy(f"run folder {run_dir} is in use by another training ({where}); wait for it to end or "
                            f"stop it (kill -TERM {pid}), or choose another output_dir / tracking.run_name") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return RunLock(fd, path)


def check_free(run_dir: str | os.PathLike) -> None:
    """Raise :class:`RunFolderBusy` if a training holds ``run_dir`` now (a probe: takes and frees the lock).
    Creates nothing when the folder does not exist yet."""
    if (Path(run_dir) / LOCK_NAME).is_file():
        acquire(run_dir).release()
