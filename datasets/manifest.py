"""manifest.json: what a folder of betons holds.

Layout (written by ``datasets/write_ffcv.py``, read by the training engine)::

    {"format": 1,
     "dataset": "demo" | "imagenet" | "tinyimagenet",
     "layout": "imagefolder" | "devkit" | "kaggle" | "ilsvrc-tars" | "tinyimagenet" | null,
     "num_classes": C,
     "classes": [{"index": i, "wnid": str, "name": str,
                  "superclass": int | null, "superclass_name": str | null}, ...],
     "splits": {"train": {"beton": "train.beton", "count": n, "per_class": [C ints],
                          "rejected": r, "found": f, "sha256": "...",
                          "bytes": size, "quick_sha256": "..."},
                "val": {...}},
     "writer": {...settings...}, "source_root": str | null, "seed": int | null,
     "num_superclasses": S | null, "created": "...", "seconds": ...}

Invariants checked by :func:`validate_manifest`: ``count == sum(per_class)``,
``count + rejected == found``, class indices are ``0..C-1`` in order.

Betons against their manifest: ``write_ffcv.py verify`` re-reads them whole (``sha256``, per-class
counts); :func:`quick_check`, run by every training at start, reads a little of each beton (size,
the FFCV header's sample count, ``quick_sha256``: see :func:`quick_digest`). Manifests written before
``bytes`` / ``quick_sha256`` existed are checked on what they record.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ssal_datasets.files import atomic_write

MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.txt"
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or inconsistent; the message names the file."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


QUICK_BLOCK = 1 << 20  # read at the start of a beton
QUICK_SAMPLES = 64  # samples whose data is read, evenly spread over the allocation table
QUICK_SAMPLE_BYTES = 1 << 16  # at most this much of each
# = ffcv.types.HeaderType / ALLOC_TABLE_TYPE (not imported: reading a manifest needs no FFCV)
_FFCV_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                         ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
_FFCV_ALLOC = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])


def quick_digest(path: str | os.PathLike) -> str:
    """sha256 of a beton's size, its first MiB (header, field descriptions, the first samples' metadata), its
    allocation table (where each sample's data lies: 24 bytes a sample) and up to 64 KiB of the data of 64
    samples spread over it. Reads ~5 MiB + 31 MB on ImageNet's train beton (not its 140 GB), and tells
    betons written from other images, settings or seeds apart, though their sizes and counts agree."""
    size = os.path.getsize(path)
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        first = f.read(QUICK_BLOCK)
        h.update(first)
        if len(first) < _FFCV_HEADER.itemsize:
            return h.hexdigest()
        table_at = int(np.frombuffer(first[:_FFCV_HEADER.itemsize], dtype=_FFCV_HEADER)[0]["alloc_table_ptr"])
        if not 0 < table_at < size:
            return h.hexdigest()
        f.seek(table_at)
        table_bytes = f.read()
        h.update(table_bytes)
        table = np.frombuffer(table_bytes[:len(table_bytes) // _FFCV_ALLOC.itemsize * _FFCV_ALLOC.itemsize],
                              dtype=_FFCV_ALLOC)
        if len(table):
            for row in table[np.linspace(0, len(table) - 1, min(QUICK_SAMPLES, len(table))).astype(np.int64)]:
                f.seek(int(row["ptr"]))
                h.update(f.read(min(int(row["size"]), QUICK_SAMPLE_BYTES)))
    return h.hexdigest()


def quick_check(directory: str | os.PathLike, manifest: dict) -> list[str]:
    """Problems of the betons in ``directory`` against ``manifest`` (empty = they match), each naming the file
    and the fix. Reads a little of each beton (:func:`quick_digest`); the full check is ``write_ffcv.py verify``."""
    problems = []
    rewrite = f"rewrite it with datasets/write_ffcv.py, or point data.root at the betons of {MANIFEST_NAME}"
    for split, s in manifest["splits"].items():
        path = Path(directory) / s["beton"]
        if not path.is_file():
            problems.append(f"{path}: missing, but {MANIFEST_NAME} lists it; {rewrite}")
            continue
        size = path.stat().st_size
        if "bytes" in s and size != s["bytes"]:
            problems.append(f"{path}: {size} bytes, {MANIFEST_NAME} says {s['bytes']} (another or a truncated "
                            f"beton); {rewrite}")
            continue
        header = np.fromfile(path, dtype=_FFCV_HEADER, count=1)
        if header.size == 0 or int(header[0]["num_samples"]) != s["count"]:
            found = f"{int(header[0]['num_samples'])} samples" if header.size else "no FFCV header"
            problems.append(f"{path}: {found}, {MANIFEST_NAME} says {s['count']}; {rewrite}")
            continue
        if "quick_sha256" in s and quick_digest(path) != s["quick_sha256"]:
            problems.append(f"{path}: content differs from the beton {MANIFEST_NAME} describes (quick_sha256; "
                            f"same size, other images or seed); {rewrite}")
    return problems


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> Path:
    validate_manifest(manifest, where=str(Path(out_dir) / MANIFEST_NAME))
    path = Path(out_dir) / MANIFEST_NAME
    atomic_write(path, json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return path


def _fail(where: str, msg: str):
    raise ManifestError(f"{where}: {msg}")


def validate_manifest(m: dict, where: str = MANIFEST_NAME) -> dict:
    if not isinstance(m, dict):
        _fail(where, "not a JSON object")
    for key in ("dataset", "num_classes", "classes", "splits"):
        if key not in m:
            _fail(where, f"missing key {key!r}")
    c = m["num_classes"]
    if not isinstance(c, int) or c < 1:
        _fail(where, f"num_classes must be a positive integer, got {c!r}")
    classes = m["classes"]
    if not isinstance(classes, list) or len(classes) != c:
        _fail(where, f"classes must be a list of num_classes={c} entries")
    for i, entry in enumerate(classes):
        if not isinstance(entry, dict) or entry.get("index") != i:
            _fail(where, f"classes[{i}] must be an object with index {i}")
        for key in ("wnid", "name"):
            if not isinstance(entry.get(key), str):
                _fail(where, f"classes[{i}].{key} must be a string")
        sc = entry.get("superclass")
        if sc is not None and (not isinstance(sc, int) or sc < 0):
            _fail(where, f"classes[{i}].superclass must be a non-negative integer or null")
    splits = m["splits"]
    if not isinstance(splits, dict) or not splits:
        _fail(where, "splits must be a non-empty object")
    for name, s in splits.items():
        if not isinstance(s, dict):
            _fail(where, f"splits.{name} must be an object")
        for key in ("beton", "count", "per_class", "rejected", "found", "sha256"):
            if key not in s:
                _fail(where, f"splits.{name} is missing {key!r}")
        if not isinstance(s["per_class"], list) or len(s["per_class"]) != c:
            _fail(where, f"splits.{name}.per_class must have {c} entries")
        if sum(s["per_class"]) != s["count"]:
            _fail(where, f"splits.{name}: per_class sums to {sum(s['per_class'])}, count is {s['count']}")
        if s["count"] + s["rejected"] != s["found"]:
            _fail(where, f"splits.{name}: count {s['count']} + rejected {s['rejected']} != found {s['found']}")
        if os.path.basename(s["beton"]) != s["beton"]:
            _fail(where, f"splits.{name}.beton must be a file name in the manifest's folder")
    return m


def read_manifest(directory: str | os.PathLike) -> dict:
    """Read and validate ``<directory>/manifest.json`` (a path to the file itself is accepted too).

    Raises :class:`ManifestError` (a ``ValueError``) with a message naming the file.
    """
    path = Path(directory)
    if path.is_dir() or not path.name.endswith(".json"):
        path = path / MANIFEST_NAME
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        _fail(where, "no such file (write the dataset with datasets/write_ffcv.py)")
    except OSError as err:
        _fail(where, f"cannot read: {err}")
    try:
        m = json.loads(text)
    except json.JSONDecodeError as err:
        _fail(where, f"not valid JSON ({err})")
    return validate_manifest(m, where)


def class_names(manifest: dict) -> list[str]:
    """Human-readable class names in class-index order."""
    return [c["name"] for c in manifest["classes"]]


def superclasses(manifest: dict) -> list[int] | None:
    """Planted super-class of every class (demo set), or None where the manifest has none."""
    sc = [c.get("superclass") for c in manifest["classes"]]
    return None if any(s is None for s in sc) else sc


def beton_path(directory: str | os.PathLike, manifest: dict, split: str) -> Path:
    return Path(directory) / manifest["splits"][split]["beton"]
