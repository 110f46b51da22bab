"""Files written whole or not at all: the project's one atomic write; and the lock that keeps two
processes from writing one folder at once.

It lives here, in the lowest layer, because both the dataset writer (manifest, rejects list) and
the pipeline (checkpoints, configs, tracking state) need it and ``ssal_datasets`` imports nothing
of ``pipeline``. The content goes to a temporary file beside the target (``.<name>.tmp-<pid>``),
is flushed to disk, then renamed over the target, and the rename itself is made durable: a crash
(or kill, or a full disk) during the write leaves the previous file intact.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Union

__all__ = ["atomic_write", "atomic_link", "sync_folder", "temporary_path", "temporaries_in", "TEMPORARY_NAME", "exclusive_lock",
           "Busy"]

#: What to write: text (UTF-8), bytes, or a function that writes into the open binary file.
Content = Union[str, bytes, Callable[[BinaryIO], None]]


#: The name of a temporary file left by a write that was killed before its rename (``<pid>``: the writer).
TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def temporary_path(path: str | os.PathLike) -> Path:
    """The temporary file this process writes ``path``'s new content to before renaming it over
    ``path``: ``.<name>.tmp-<pid>`` beside it (matched by :data:`TEMPORARY_NAME`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def temporaries_in(folder: str | os.PathLike) -> list[tuple[Path, int]]:
    """``(path, writer's pid)`` of every temporary file (:func:`temporary_path`'s name) in ``folder``,
    sorted by path: the leftovers of writes killed before their rename, and those still running.
    A folder that does not exist holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        match = TEMPORARY_NAME.match(path.name)
        if match is not None and path.is_file():
            found.append((path, int(match["pid"])))
    return found


def atomic_write(path: str | os.PathLike, content: Content, *,
                 before_replace: Callable[[Path], None] | None = None) -> Path:
    """Write ``content`` to ``path`` atomically (parent folders are created). ``before_replace(path)``
    runs after the temporary file is on disk and before the rename. Returns ``path`` as a Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            if callable(content):
                content(handle)
            else:
                handle.write(content.encode("utf-8") if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _rename_over(tmp, path, before_replace)
    return path


def atomic_link(source: str | os.PathLike, path: str | os.PathLike, *,
                before_replace: Callable[[Path], None] | None = None) -> Path:
    """Make ``path`` a hard link to ``source`` as atomic_write writes: a link under the temporary name, renamed
    over ``path``. A later atomic write of either name renames a new file over that name and leaves the other
    name on the old file. Raises OSError where the filesystem takes no hard links."""
    path = Path(path)
    tmp = temporary_path(path)
    tmp.unlink(missing_ok=True)
    os.link(source, tmp)
    _rename_over(tmp, path, before_replace)
    return path


def _rename_over(tmp: Path, path: Path, before_replace: Callable[[Path], None] | None) -> None:
    """Rename the finished temporary ``tmp`` over ``path`` (``before_replace(path)`` first), durably."""
    try:
        if before_replace is not None:
            before_replace(path)
        os.replace(tmp, path)
    finally:
        # also when rename() did nothing: two links to one file (``path`` already is ``tmp``'s file)
        if tmp.exists():
            tmp.unlink()
    sync_folder(path.parent)


def sync_folder(folder: str | os.PathLike) -> None:
    """fsync a folder: makes the renames (and links) done in it durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Busy(RuntimeError):
    """Another process holds the lock; ``holder`` is its pid as it wrote it (None: unknown)."""

    def __init__(self, path: Path, holder: int | None):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by {self.who}")

    @property
    def who(self) -> str:
        """The holder as a message names it: ``pid N``, or ``another process``."""
        return f"pid {self.holder}" if self.holder else "another process"


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, wait: bool) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on the file ``path`` (created if missing) while the block runs; the
    kernel drops it when the process dies, so a killed holder leaves no stale lock. ``wait=False``
    raises :class:`Busy` at once if another process holds it. The file stays (removing a lock file that
    others may have opened lets two processes hold "the" lock at once) and holds the holder's pid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            raise Busy(path, int(text) if text.isdigit() else None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock
