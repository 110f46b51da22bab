"""Finding the images and labels of a dataset on disk (no decoding here).

Each scanner returns a :class:`Source`: the class list and, per split, the list of
``(path, label)`` candidates in a deterministic order (classes sorted by wnid, files by name).
Layout problems raise :class:`DataError` with a one-line message.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ssal_datasets.images import is_image_name


class DataError(Exception):
    """A user-facing problem (bad root, bad layout, existing output ...): printed as one line."""


@dataclass
class ClassInfo:
    wnid: str
    name: str
    superclass: int | None = None
    superclass_name: str | None = None


@dataclass
class Source:
    dataset: str
    root: str | None
    classes: list[ClassInfo]
    splits: dict[str, list[tuple[str, int]]]
    # files found but not usable as samples for a layout reason (e.g. no label): (split, path, reason)
    layout_rejects: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: how the files were found, named in manifest.json: imagefolder, devkit, kaggle, ilsvrc-tars, tinyimagenet
    layout: str | None = None


def _listdir(path: Path) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _class_files(class_dir: Path, what: str) -> list[str]:
    """Every regular (non-hidden) file in a class folder, sorted; error if there is none."""
    files = [e.path for e in _listdir(class_dir) if e.is_file()]
    if not files:
        raise DataError(f"{what} {class_dir}: class directory has no images")
    return files


def first_names(text: str) -> str:
    return text.split(",")[0].strip() or text.strip()


def read_names_file(path: Path) -> dict[str, str]:
    """``words.txt`` (wnid<TAB>names) or ``LOC_synset_mapping.txt`` / ``synset_words.txt`` (wnid names)."""
    names = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        if "\t" in line:
            wnid, rest = line.split("\t", 1)
        elif " " in line:
            wnid, rest = line.split(" ", 1)
        else:
            continue
        names[wnid.strip()] = first_names(rest)
    return names


NAME_FILES = ("words.txt", "LOC_synset_mapping.txt", "synset_words.txt")


def imagenet_names(root: Path, wnids: list[str]) -> tuple[dict[str, str], str]:
    for folder in (root, root.parent):
        for fname in NAME_FILES:
            p = folder / fname
            if p.is_file():
                names = read_names_file(p)
                if any(w in names for w in wnids):
                    return names, str(p)
    if len(wnids) == 1000 and all(w.startswith("n") and w[1:].isdigit() for w in wnids):
        # Standard ImageNet-1k: class i = i-th sorted wnid, the order of torchvision's category list.
        try:
            from torchvision.models._meta import _IMAGENET_CATEGORIES as cats
            return dict(zip(wnids, cats)), "torchvision ImageNet-1k category list (sorted-wnid order)"
        except Exception:  # pragma: no cover - torchvision missing
            pass
    return {}, "none (names = wnids)"


def check_root(root: str | os.PathLike) -> Path:
    p = Path(root).expanduser()
    if not p.exists():
        raise DataError(f"--root {root}: no such directory")
    if not p.is_dir():
        raise DataError(f"--root {root}: not a directory")
    return p.resolve()


def _looks_tiny(root: Path) -> bool:
    return (root / "wnids.txt").is_file() or (root / "val" / "val_annotations.txt").is_file()


def class_folders(train: Path, shown: str) -> tuple[list[str], list[tuple[str, int]]]:
    """``train/<wnid>/*``: the sorted wnids and the ``(path, label)`` of every file, class-major, by name."""
    train_dirs = _listdir(train)
    if any(e.is_file() for e in train_dirs):
        loose = next(e.name for e in train_dirs if e.is_file())
        raise DataError(f"{shown}: {train.name}/ holds files directly (e.g. {loose}); expected {train.name}/<wnid>/ "
                        f"folders")
    wnids = [e.name for e in train_dirs if e.is_dir()]
    if not wnids:
        raise DataError(f"{shown}: {train.name}/ has no class directories")
    from tqdm import tqdm

    files = []
    with tqdm(wnids, desc=f"list {train.name}", unit="class", file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        for k, w in enumerate(bar):  # the bar is closed (its line cleared) before an error is printed
            files += [(p, k) for p in _class_files(train / w, "train")]
    return wnids, files


def loose_images(folder: Path) -> list[str]:
    """The image files directly in ``folder`` (a flat val/), sorted by name."""
    return [e.name for e in _listdir(folder) if e.is_file() and is_image_name(e.name)]


def scan_imagenet(root: str | os.PathLike) -> Source:
    """ImageFolder layout: ``train/<wnid>/*``, ``val/<wnid>/*``."""
    r = check_root(root)
    if _looks_tiny(r):
        raise DataError(f"--root {root}: this is a tiny-imagenet-200 layout (wnids.txt, val/val_annotations.txt); "
                        f"use the tinyimagenet sub-command")
    if not (r / "train").is_dir() or not (r / "val").is_dir():
        raise DataError(f"--root {root}: not an ImageNet layout (expected train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)")
    wnids, train = class_folders(r / "train", f"--root {root}")
    index = {w: i for i, w in enumerate(wnids)}
    loose = loose_images(r / "val")
    if loose:
        raise DataError(f"--root {root}: val/ holds images directly (e.g. {loose[0]}) but no devkit was found "
                        f"(ILSVRC2012_devkit_t12/ or its tar, next to val/); add it or sort val/ into val/<wnid>/ (Kaggle's "
                        f"CLS-LOC: give the folder holding ILSVRC/ and LOC_val_solution.csv)")
    val = []
    for e in _listdir(r / "val"):
        if not e.is_dir():
            continue
        if e.name not in index:
            raise DataError(f"--root {root}: val/{e.name} is not a class of train/")
        val += [(p, index[e.name]) for p in _class_files(Path(e.path), "val")]
    if not val:
        raise DataError(f"--root {root}: val/ has no class directories")
    names, names_from = imagenet_names(r, wnids)
    classes = [ClassInfo(w, names.get(w, w)) for w in wnids]
    return Source("imagenet", str(r), classes, {"train": train, "val": val},
                  notes=["layout: imagefolder", f"class names: {names_from}"], layout="imagefolder")


def scan_tinyimagenet(root: str | os.PathLike) -> Source:
    """The official ``tiny-imagenet-200`` layout."""
    r = check_root(root)
    need = [r / "wnids.txt", r / "train", r / "val" / "images", r / "val" / "val_annotations.txt"]
    missing = [str(p.relative_to(r)) for p in need if not p.exists()]
    if missing:
        hint = "; it looks like an ImageNet layout, use the imagenet sub-command" if (r / "train").is_dir() and not (r / "wnids.txt").exists() else ""
        raise DataError(f"--root {root}: not a tiny-imagenet-200 layout (missing {', '.join(missing)}){hint}")
    listed = [w.strip() for w in (r / "wnids.txt").read_text().splitlines() if w.strip()]
    if not listed:
        raise DataError(f"{r / 'wnids.txt'}: no wnids")
    if len(set(listed)) != len(listed):
        raise DataError(f"{r / 'wnids.txt'}: duplicate wnids")
    wnids = sorted(listed)
    index = {w: i for i, w in enumerate(wnids)}
    train = []
    for w in wnids:
        d = r / "train" / w / "images"
        if not d.is_dir():
            raise DataError(f"train {r / 'train' / w}: class directory missing (expected {d})")
        train += [(p, index[w]) for p in _class_files(d, "train")]
    extra = [e.name for e in _listdir(r / "train") if e.is_dir() and e.name not in index]
    if extra:
        raise DataError(f"--root {root}: train/{extra[0]} is not listed in wnids.txt")
    # val: labels from val_annotations.txt
    labels: dict[str, int] = {}
    ann = r / "val" / "val_annotations.txt"
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise DataError(f"{ann}:{n}: expected 'file<TAB>wnid<TAB>box...', got {line!r}")
        fname, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in index:
            raise DataError(f"{ann}:{n}: wnid {wnid} is not in wnids.txt")
        labels[fname] = index[wnid]
    layout_rejects = []
    present = {e.name: e.path for e in _listdir(r / "val" / "images") if e.is_file()}
    val = []
    for fname in sorted(present):
        if fname in labels:
            val.append((present[fname], labels[fname]))
        else:
            layout_rejects.append(("val", present[fname], "no label in val/val_annotations.txt"))
    for fname in sorted(set(labels) - set(present)):
        layout_rejects.append(("val", str(r / "val" / "images" / fname), "listed in val_annotations.txt but missing"))
    val.sort(key=lambda t: (t[1], t[0]))  # class-major, like the ImageNet layout
    notes = []
    if (r / "test").exists():
        notes.append(f"{r / 'test'}: skipped (the test split has no labels)")
    names = {}
    if (r / "words.txt").is_file():
        names = read_names_file(r / "words.txt")
        notes.append(f"class names: {r / 'words.txt'}")
    classes = [ClassInfo(w, names.get(w, w)) for w in wnids]
    return Source("tinyimagenet", str(r), classes, {"train": train, "val": val}, layout_rejects, notes,
                  layout="tinyimagenet")


def take_subset(source: Source, n: int) -> Source:
    """Keep the first ``n`` candidates of every class in every split (``--subset``)."""
    out = {}
    for split, items in source.splits.items():
        seen: dict[int, int] = {}
        kept = []
        for path, label in items:
            if seen.get(label, 0) < n:
                kept.append((path, label))
                seen[label] = seen.get(label, 0) + 1
        out[split] = kept
    source.splits = out
    return source
