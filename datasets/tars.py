"""Images read straight out of the ILSVRC2012 tar files, without extracting them.

``ILSVRC2012_img_train.tar`` holds one uncompressed tar per class (``<wnid>.tar``), and
``ILSVRC2012_img_val.tar`` the 50,000 validation JPEGs. Both are plain (not gzipped) tars, so
every image is a byte range of the outer file: :func:`index_nested_tar` and :func:`index_flat_tar`
read only the headers (seeking over the data) and give a :class:`TarMember` per image; the
writer's check pass then streams runs of neighbouring members (:func:`stream_run`, tarfile
mode ``'r|'``: each byte read once, in order, memory bounded by one image), and FFCV's writer
workers read each member by its offset (:meth:`TarMember.read`, one ``pread``).
"""
from __future__ import annotations

import io
import os
import sys
import tarfile
from dataclasses import dataclass
from typing import Iterator

#: members streamed by one check job: neighbours in one inner tar, read in one go
RUN_MEMBERS = 64
#: a larger gap between two wanted members starts a new run (``--subset`` wants few members of each tar)
RUN_GAP = 1 << 22
_open_files: dict[str, int] = {}  # per process: tar path -> file descriptor (pread needs no shared offset)


@dataclass(frozen=True, slots=True)
class TarMember:
    """One image inside a tar file on disk, by byte range."""

    tar: str  # the tar file on disk
    container: int  # where the tar holding it starts (an inner tar's data offset; 0 for the outer tar)
    header: int  # where its tar header starts, relative to the file
    offset: int  # where its bytes start, relative to the file
    size: int
    name: str  # shown in rejects.txt: ILSVRC2012_img_train.tar:n01440764.tar:n01440764_18.JPEG

    def __str__(self) -> str:
        return self.name

    @property
    def basename(self) -> str:
        return self.name.rsplit(":", 1)[-1].rsplit("/", 1)[-1]

    def read(self) -> bytes:
        fd = _open_files.get(self.tar)
        if fd is None:
            fd = _open_files[self.tar] = os.open(self.tar, os.O_RDONLY)
        data = os.pread(fd, self.size, self.offset)
        if len(data) != self.size:
            raise OSError(f"{self.tar}: ends inside {self.name} (truncated tar?)")
        return data


class _Window(io.RawIOBase):
    """Read-only, seekable view of the bytes ``[start, start + length)`` of a file."""

    def __init__(self, path: str, start: int, length: int):
        super().__init__()
        self._f = open(path, "rb", buffering=0)  # the index reads 512-byte headers far apart: no read-ahead
        self._start, self._length, self._pos = start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got

    def close(self) -> None:
        self._f.close()
        super().close()


def _headers(path: str, start: int, length: int) -> Iterator[tarfile.TarInfo]:
    """The file members of the tar at ``[start, start + length)`` of ``path``, headers only; memory flat."""
    with _Window(path, start, length) as window, tarfile.open(fileobj=window, mode="r:") as tf:
        while (info := tf.next()) is not None:
            tf.members.clear()  # tarfile keeps every header it has read; 50,000 of them for the val tar
            if info.isfile():
                yield info


def index_flat_tar(path: str) -> list[TarMember]:
    """Every file of a tar of images (the val tar)."""
    from tqdm import tqdm

    base = os.path.basename(path)
    with tqdm(desc=f"index {base}", unit="file", file=sys.stderr, dynamic_ncols=True, miniters=1000) as bar:
        found = []
        for m in _headers(path, 0, os.path.getsize(path)):
            found.append(TarMember(path, 0, m.offset, m.offset_data, m.size, f"{base}:{m.name}"))
            bar.update(1)
    return found


def index_nested_tar(path: str) -> dict[str, list[TarMember]]:
    """The train tar: ``{inner tar's stem (the wnid): its files}``; other members are ignored."""
    from tqdm import tqdm

    base, size = os.path.basename(path), os.path.getsize(path)
    found: dict[str, list[TarMember]] = {}
    with tqdm(desc=f"index {base}", unit="tar", file=sys.stderr, dynamic_ncols=True) as bar:
        for inner in _headers(path, 0, size):
            if not inner.name.endswith(".tar"):
                continue
            at = inner.offset_data
            prefix = f"{base}:{inner.name}:"
            found[os.path.basename(inner.name)[:-4]] = [
                TarMember(path, at, at + m.offset, at + m.offset_data, m.size, prefix + m.name)
                for m in _headers(path, at, inner.size)]
            bar.update(1)
    return found


def runs(indexed: list[tuple[int, TarMember]]) -> list[list[tuple[int, TarMember]]]:
    """Split ``(item index, member)`` pairs into runs a check job streams: members of one container, in the
    order of their bytes, at most :data:`RUN_MEMBERS` each and no more than :data:`RUN_GAP` bytes apart."""
    ordered = sorted(indexed, key=lambda t: (t[1].tar, t[1].offset))
    out: list[list[tuple[int, TarMember]]] = []
    for item in ordered:
        last = out[-1][-1][1] if out else None
        member = item[1]
        if last is None or len(out[-1]) >= RUN_MEMBERS or (last.tar, last.container) != (member.tar, member.container) \
                or member.header - (last.offset + last.size) > RUN_GAP:
            out.append([])
        out[-1].append(item)
    return out


def stream_run(run: list[tuple[int, TarMember]]) -> Iterator[tuple[int, bytes | None]]:
    """Stream one run's byte range once with tarfile (mode ``'r|'``): ``(item index, bytes)`` per member of the
    run, ``None`` for a member the stream did not reach (a damaged tar)."""
    first, last = run[0][1], run[-1][1]
    start, wanted = first.header, {m.offset: i for i, m in run}
    with _Window(first.tar, start, last.offset + last.size - start) as window:
        try:
            with tarfile.open(fileobj=window, mode="r|") as tf:
                for info in tf:
                    i = wanted.pop(start + info.offset_data, None)
                    if i is not None:
                        yield i, tf.extractfile(info).read()
                        if not wanted:
                            break  # the window ends with the last member's bytes: no header follows
        except (tarfile.TarError, OSError, EOFError):
            pass  # the members not reached are reported below
    for i in wanted.values():
        yield i, None
