"""ImageNet as it comes: which layout a folder holds, and its images and labels in each.

* ``imagefolder``  ``train/<wnid>/*``, ``val/<wnid>/*`` (:func:`ssal_datasets.layouts.scan_imagenet`);
* ``devkit``       ``train/<wnid>/*``, a flat ``val/`` of ``ILSVRC2012_val_*.JPEG`` and the devkit
  (``ILSVRC2012_devkit_t12/`` or its tar): ``data/ILSVRC2012_validation_ground_truth.txt`` gives the
  ILSVRC2012_ID of val image k (line k), ``data/meta.mat`` the wnid of each id (ids are not in
  sorted-wnid order; read as torchvision's ``parse_meta_mat`` does, leaf synsets only);
* ``kaggle``       ``ILSVRC/Data/CLS-LOC/{train/<wnid>,val}`` + ``LOC_val_solution.csv`` (+ names in
  ``LOC_synset_mapping.txt``);
* ``ilsvrc-tars``  ``ILSVRC2012_img_train.tar`` (one ``<wnid>.tar`` per class) and
  ``ILSVRC2012_img_val.tar`` + the devkit, read in place (:mod:`ssal_datasets.tars`).

Class k is the k-th wnid of the train classes in sorted order, and every split is ordered by
(label, file name), so every layout of the same images gives the same betons.
"""
from __future__ import annotations

import csv
import io
import os
import re
import tarfile
from pathlib import Path

import numpy as np

from ssal_datasets.layouts import (ClassInfo, DataError, Source, check_root, class_folders, first_names,
                                   loose_images, read_names_file, scan_imagenet)
from ssal_datasets.tars import index_flat_tar, index_nested_tar

#: ImageNet-1k (ILSVRC2012) as published
KNOWN_COUNTS = {"train": 1_281_167, "val": 50_000, "classes": 1_000}
TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12"
DEVKIT_NAMES = (DEVKIT, f"{DEVKIT}.tar.gz", f"{DEVKIT}.tar")
GROUND_TRUTH, META = "ILSVRC2012_validation_ground_truth.txt", "meta.mat"
KAGGLE_DATA = Path("ILSVRC", "Data", "CLS-LOC")
KAGGLE_VAL, KAGGLE_NAMES = "LOC_val_solution.csv", "LOC_synset_mapping.txt"
LAYOUTS_LOOKED_FOR = (f"{TRAIN_TAR} + {VAL_TAR} (tars); {KAGGLE_DATA}/{{train,val}} + {KAGGLE_VAL} (Kaggle); "
                      f"train/<wnid>/ + val/<wnid>/ (ImageFolder); train/<wnid>/ + flat val/ + {DEVKIT}[.tar.gz] "
                      f"(devkit)")
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d+)")


def detect(root: Path) -> str:
    """The layout of ``root`` by looking at what it holds; one-line error naming what was looked for."""
    if (root / TRAIN_TAR).is_file() or (root / VAL_TAR).is_file():
        return "ilsvrc-tars"
    if (root / KAGGLE_DATA).is_dir():
        return "kaggle"
    if (root / "train").is_dir() and (root / "val").is_dir():
        return "devkit" if loose_images(root / "val") and find_devkit(root) else "imagefolder"
    raise DataError(f"--root {root}: no ImageNet layout found; looked for {LAYOUTS_LOOKED_FOR}")


def scan(root=None, *, train_tar=None, val_tar=None, devkit=None) -> Source:
    """The :class:`Source` of ``--root`` (layout by :func:`detect`) or of the tar paths given."""
    if root is not None and (train_tar or val_tar):
        raise DataError("imagenet: give --root DIR or --train-tar / --val-tar, not both")
    if root is None:
        if not (train_tar and val_tar):
            raise DataError("imagenet: give --root DIR, or both --train-tar and --val-tar (and --devkit)")
        return scan_tars(_file(train_tar, "--train-tar"), _file(val_tar, "--val-tar"), devkit)
    r = check_root(root)
    layout = detect(r)
    if layout == "ilsvrc-tars":
        missing = [n for n in (TRAIN_TAR, VAL_TAR) if not (r / n).is_file()]
        if missing:
            raise DataError(f"--root {root}: holds the ILSVRC2012 tars but not {missing[0]}")
        return scan_tars(r / TRAIN_TAR, r / VAL_TAR, devkit, root=r)
    if layout == "kaggle":
        return scan_kaggle(r)
    if layout == "devkit":
        return scan_devkit(r, devkit)
    return scan_imagenet(r)


def _file(path, option: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{option} {path}: no such file")
    return p.resolve()


# ---------------------------------------------------------------- the devkit
def find_devkit(folder: Path) -> Path | None:
    """The devkit in ``folder``: its folder or tar, or ground truth + meta.mat lying there."""
    for name in DEVKIT_NAMES:
        if (folder / name).exists():
            return folder / name
    return folder if (folder / GROUND_TRUTH).is_file() and (folder / META).is_file() else None


def _devkit_files(path: Path) -> tuple[bytes, bytes]:
    """The bytes of the ground truth and of meta.mat in a devkit folder or tar."""
    shown = f"devkit {path}: expected data/{GROUND_TRUTH} and data/{META}"
    if path.is_dir():
        for folder in (path / "data", path):
            if (folder / GROUND_TRUTH).is_file() and (folder / META).is_file():
                return (folder / GROUND_TRUTH).read_bytes(), (folder / META).read_bytes()
        raise DataError(f"{shown} in it")
    try:
        with tarfile.open(path, "r:*") as tf:
            found = {os.path.basename(m.name): m for m in tf.getmembers() if m.isfile()}
            if GROUND_TRUTH not in found or META not in found:
                raise DataError(f"{shown} in the tar")
            return tf.extractfile(found[GROUND_TRUTH]).read(), tf.extractfile(found[META]).read()
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"devkit {path}: not a readable tar ({err})") from None


def read_devkit(path: Path) -> tuple[dict[int, str], dict[str, str]]:
    """``({val image number: wnid}, {wnid: name})`` from a devkit (folder or tar)."""
    import scipy.io

    truth, meta_bytes = _devkit_files(path)
    try:
        synsets = np.atleast_1d(scipy.io.loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"])
        leaves = [s for s in synsets if int(s["num_children"]) == 0]  # the 1,000 classes; the rest are groups
        wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
        names = {str(s["WNID"]): first_names(str(s["words"])) for s in leaves}
    except (KeyError, ValueError, TypeError, IndexError) as err:
        raise DataError(f"devkit {path}: {META} has no readable 'synsets' table ({err})") from None
    labels = {}
    for k, line in enumerate(truth.decode("ascii", errors="replace").split(), 1):
        if not line.isdigit() or int(line) not in wnid_of:
            raise DataError(f"devkit {path}: {GROUND_TRUTH} line {k}: {line!r} is not an ILSVRC2012_ID of {META}")
        labels[k] = wnid_of[int(line)]
    return labels, names


def _wnid_by_number(labels: dict[int, str]):
    def wnid_of(name: str) -> str | None:
        m = _VAL_NUMBER.search(name)
        return labels.get(int(m.group(1))) if m else None
    return wnid_of


def _labelled(found, wnid_of, index: dict[str, int], where: str):
    """Flat val images ``(source, file name)`` labelled by ``wnid_of(file name)``, ordered by (label, name) like
    val/<wnid>/ folders; the unlabelled ones as layout rejects."""
    val, rejects = [], []
    for source, name in found:
        wnid = wnid_of(name)
        if wnid is None:
            rejects.append(("val", str(source), f"no label in {where}"))
        elif wnid not in index:
            rejects.append(("val", str(source), f"class {wnid} ({where}) is not a class of train"))
        else:
            val.append((index[wnid], name, source))
    val.sort(key=lambda t: t[:2])
    return [(source, label) for label, _, source in val], rejects


def _source(layout: str, root: Path, wnids, names: dict, names_from: str, train, val, rejects) -> Source:
    if not val:
        raise DataError(f"{root}: no labelled val images")
    classes = [ClassInfo(w, names.get(w, w)) for w in wnids]
    return Source("imagenet", str(root), classes, {"train": train, "val": val}, rejects,
                  [f"layout: {layout}", f"class names: {names_from}"], layout=layout)


def scan_devkit(root: Path, devkit=None) -> Source:
    kit = _devkit_path(devkit) or find_devkit(root)
    wnids, train = class_folders(root / "train", f"--root {root}")
    labels, names = read_devkit(kit)
    found = [(str(root / "val" / n), n) for n in loose_images(root / "val")]
    val, rejects = _labelled(found, _wnid_by_number(labels), {w: i for i, w in enumerate(wnids)}, GROUND_TRUTH)
    return _source("devkit", root, wnids, names, f"{kit} ({META})", train, val, rejects)


def _devkit_path(devkit) -> Path | None:
    if devkit is None:
        return None
    p = Path(devkit).expanduser()
    if not p.exists():
        raise DataError(f"--devkit {devkit}: no such file or folder")
    return p.resolve()


# ---------------------------------------------------------------- Kaggle
def scan_kaggle(root: Path) -> Source:
    data = root / KAGGLE_DATA
    csv_path = root / KAGGLE_VAL
    if not (data / "train").is_dir() or not (data / "val").is_dir() or not csv_path.is_file():
        raise DataError(f"--root {root}: a Kaggle layout needs {KAGGLE_DATA}/train, {KAGGLE_DATA}/val and "
                        f"{KAGGLE_VAL} next to ILSVRC/")
    wnids, train = class_folders(data / "train", f"--root {root}")
    labels = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if n == 1 and row and row[0] == "ImageId":
                continue
            if len(row) < 2 or not row[1].split():
                raise DataError(f"{csv_path}:{n}: expected 'ImageId,wnid x y x y ...', got {','.join(row)!r}")
            labels[row[0].strip()] = row[1].split()[0]
    found = [(str(data / "val" / n), n) for n in loose_images(data / "val")]
    val, rejects = _labelled(found, lambda name: labels.get(Path(name).stem), {w: i for i, w in enumerate(wnids)},
                             KAGGLE_VAL)
    names_file = root / KAGGLE_NAMES
    names = read_names_file(names_file) if names_file.is_file() else {}
    return _source("kaggle", root, wnids, names, str(names_file) if names else "none (names = wnids)",
                   train, val, rejects)


# ---------------------------------------------------------------- the ILSVRC2012 tars
def scan_tars(train_tar: Path, val_tar: Path, devkit=None, root: Path | None = None) -> Source:
    kit = _devkit_path(devkit) or find_devkit(val_tar.parent)
    if kit is None:
        raise DataError(f"{val_tar}: its labels are in the devkit; put {DEVKIT}.tar.gz (or {GROUND_TRUTH} and "
                        f"{META}) next to it, or pass --devkit")
    labels, names = read_devkit(kit)
    per_class = _indexed(index_nested_tar, train_tar)
    val_members = _indexed(index_flat_tar, val_tar)
    if not per_class:
        raise DataError(f"{train_tar}: holds no per-class tars (<wnid>.tar)")
    wnids = sorted(per_class)
    empty = [w for w in wnids if not per_class[w]]
    if empty:
        raise DataError(f"{train_tar}: {empty[0]}.tar holds no images")
    train = [(m, k) for k, w in enumerate(wnids) for m in sorted(per_class[w], key=lambda m: m.basename)]
    found = [(m, m.basename) for m in val_members]
    val, rejects = _labelled(found, _wnid_by_number(labels), {w: i for i, w in enumerate(wnids)}, GROUND_TRUTH)
    return _source("ilsvrc-tars", root or train_tar.parent, wnids, names, f"{kit} ({META})", train, val, rejects)


def _indexed(index, path: Path):
    try:
        return index(str(path))
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"{path}: not a readable tar, cut short or damaged ({err}); check its size and checksum "
                        f"against the download's") from None


def known_count_warning(source: Source) -> str | None:
    """A line saying how ``source`` differs from ImageNet-1k's published counts, or None if it does not."""
    found = {split: len(items) + sum(1 for t in source.layout_rejects if t[0] == split)
             for split, items in source.splits.items()}
    have = {"train": found.get("train", 0), "val": found.get("val", 0), "classes": len(source.classes)}
    if have == KNOWN_COUNTS:
        return None
    return (f"ImageNet-1k has {KNOWN_COUNTS['train']:,} train / {KNOWN_COUNTS['val']:,} val images in "
            f"{KNOWN_COUNTS['classes']:,} classes; {source.root} has {have['train']:,} train / {have['val']:,} val "
            f"in {have['classes']:,} classes (a subset or an incomplete copy?)")
