"""Files written whole or not at all: the project's one atomic write.

It lives here, in the lowest layer, because both the dataset writer (manifest, rejects list) and
the pipeline (checkpoints, configs, tracking state) need it and ``ssal_datasets`` imports nothing
of ``pipeline``. The content goes to a temporary file beside the target (``.<name>.tmp-<pid>``),
is flushed to disk, then renamed over the target, and the rename itself is made durable: a crash
(or kill, or a full disk) during the write leaves the previous file intact.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO, Callable, Union

__all__ = ["atomic_write", "temporary_path", "temporaries_in", "TEMPORARY_NAME"]

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
        if before_replace is not None:
            before_replace(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path
