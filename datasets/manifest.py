"""manifest.json: what a folder of betons holds.

Layout (written by ``datasets/write_ffcv.py``, read by the training engine)::

    {"format": 1,
     "dataset": "demo" | "imagenet" | "tinyimagenet",
     "num_classes": C,
     "classes": [{"index": i, "wnid": str, "name": str,
                  "superclass": int | null, "superclass_name": str | null}, ...],
     "splits": {"train": {"beton": "train.beton", "count": n, "per_class": [C ints],
                          "rejected": r, "found": f, "sha256": "..."},
                "val": {...}},
     "writer": {...settings...}, "source_root": str | null, "seed": int | null,
     "num_superclasses": S | null, "created": "...", "seconds": ...}

Invariants checked by :func:`validate_manifest`: ``count == sum(per_class)``,
``count + rejected == found``, class indices are ``0..C-1`` in order.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> Path:
    validate_manifest(manifest, where=str(Path(out_dir) / MANIFEST_NAME))
    path = Path(out_dir) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=False) + "\n")
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
