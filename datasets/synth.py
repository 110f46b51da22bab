"""Small generated dataset trees of real image files, for tests and the loader benchmark.

:func:`make_imagenet_tree` and :func:`make_tiny_tree` write the two on-disk layouts the writer
reads, optionally with the bad files real collections contain (:data:`BAD_KINDS`):

* ``cmyk``       a CMYK JPEG            -> converted
* ``gray``       a grayscale JPEG       -> converted
* ``png``        a PNG named ``.JPEG``  -> converted
* ``truncated``  a JPEG cut in half     -> rejected
* ``empty``      a zero-byte ``.JPEG``  -> rejected

:func:`make_ilsvrc_forms` writes one miniature ImageNet in the four forms ImageNet comes in
(ImageFolder, devkit, Kaggle, the ILSVRC2012 tars) for the layout tests.

Image content: a smooth random colour field with a class-dependent bright square, so files of
different classes differ; each file's label is recoverable from its folder.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

BAD_KINDS = ("cmyk", "gray", "png", "truncated", "empty")
CONVERTIBLE = ("cmyk", "gray", "png")
UNREADABLE = ("truncated", "empty")


def synth_image(rng: np.random.Generator, label: int, h: int, w: int) -> np.ndarray:
    low = rng.uniform(0, 255, (4, 4, 3)).astype(np.float32)
    img = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((w, h), Image.BILINEAR), dtype=np.float32)
    img = img * 0.6 + rng.normal(0, 12, (h, w, 3))
    s = max(2, min(h, w) // 3)
    y0, x0 = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    color = np.array([(label * 67) % 256, (label * 151 + 80) % 256, (label * 29 + 160) % 256], np.float32)
    img[y0:y0 + s, x0:x0 + s] = color
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg_bytes(arr: np.ndarray, quality: int = 90, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_image(path: Path, rng: np.random.Generator, label: int, size: tuple[int, int], kind: str = "ok") -> None:
    h, w = size
    arr = synth_image(rng, label, h, w)
    if kind == "ok":
        data = _jpeg_bytes(arr)
    elif kind == "cmyk":
        data = _jpeg_bytes(arr, mode="CMYK")
    elif kind == "gray":
        data = _jpeg_bytes(arr, mode="L")
    elif kind == "png":
        data = _jpeg_bytes(arr, fmt="PNG")
    elif kind == "truncated":
        full = _jpeg_bytes(arr)
        data = full[: len(full) // 2]
    elif kind == "empty":
        data = b""
    else:
        raise ValueError(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _sizes(rng, n, size_range):
    lo, hi = size_range
    return [(int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))) for _ in range(n)]


def make_imagenet_tree(root: str | os.PathLike, *, num_classes: int = 3, train_per_class: int = 6,
                       val_per_class: int = 2, size_range=(24, 48), bad: dict | None = None, seed: int = 0,
                       wnid_fmt: str = "n{:08d}") -> dict:
    """ImageNet layout under ``root``. ``bad`` maps (split, class index) -> list of bad kinds,
    written *in addition* to the good files. Returns {"wnids", "expected": {split: per-class good counts},
    "rejects": {split: count}}."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    wnids = [wnid_fmt.format(1000 + 7 * i) for i in range(num_classes)]
    bad = bad or {}
    expected = {"train": [0] * num_classes, "val": [0] * num_classes}
    rejects = {"train": 0, "val": 0}
    for split, per in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(wnids):
            for k, size in enumerate(_sizes(rng, per, size_range)):
                write_image(root / split / wnid / f"{wnid}_{k:04d}.JPEG", rng, c, size)
                expected[split][c] += 1
            for j, kind in enumerate(bad.get((split, c), ())):
                write_image(root / split / wnid / f"{wnid}_bad{j}_{kind}.JPEG", rng, c, size_range, kind)
                if kind in UNREADABLE:
                    rejects[split] += 1
                else:
                    expected[split][c] += 1
    return {"wnids": wnids, "expected": expected, "rejects": rejects}


def make_tiny_tree(root: str | os.PathLike, *, num_classes: int = 3, train_per_class: int = 5,
                   val_per_class: int = 2, size: int = 64, bad: dict | None = None, seed: int = 0,
                   with_test: bool = True) -> dict:
    """The tiny-imagenet-200 layout under ``root`` (train/<wnid>/images, val/images + annotations)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    wnids = [f"n{9000 - 11 * i:08d}" for i in range(num_classes)]  # listed unsorted, as in the real file
    (root).mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    (root / "words.txt").write_text("".join(f"{w}\tthing {i}, other name\n" for i, w in enumerate(wnids))
                                    + "n99999999\tunused entry\n")
    order = sorted(wnids)
    bad = bad or {}
    expected = {"train": [0] * num_classes, "val": [0] * num_classes}
    rejects = {"train": 0, "val": 0}
    for w in wnids:
        c = order.index(w)
        for k in range(train_per_class):
            write_image(root / "train" / w / "images" / f"{w}_{k}.JPEG", rng, c, (size, size))
            expected["train"][c] += 1
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for j, kind in enumerate(bad.get(("train", c), ())):
            write_image(root / "train" / w / "images" / f"{w}_bad{j}.JPEG", rng, c, (size, size), kind)
            if kind in UNREADABLE:
                rejects["train"] += 1
            else:
                expected["train"][c] += 1
    lines = []
    n = 0
    for w in wnids:
        c = order.index(w)
        kinds = ["ok"] * val_per_class + list(bad.get(("val", c), ()))
        for kind in kinds:
            name = f"val_{n}.JPEG"
            n += 1
            write_image(root / "val" / "images" / name, rng, c, (size, size), kind)
            lines.append(f"{name}\t{w}\t0\t0\t{size - 1}\t{size - 1}\n")
            if kind in UNREADABLE:
                rejects["val"] += 1
            else:
                expected["val"][c] += 1
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    if with_test:
        write_image(root / "test" / "images" / "test_0.JPEG", rng, 0, (size, size))
    return {"wnids": order, "expected": expected, "rejects": rejects}


def make_bench_tree(root: str | os.PathLike, *, num_classes: int = 10, per_class: int = 100,
                    size_range=(160, 500), seed: int = 0, quality: int = 90) -> int:
    """ImageFolder tree of realistic-size JPEGs (sides uniform in ``size_range``) for bench/loader.py."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    n = 0
    for c in range(num_classes):
        d = root / f"class{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        for k, (h, w) in enumerate(_sizes(rng, per_class, size_range)):
            arr = synth_image(rng, c, h, w)
            (d / f"img{k:05d}.JPEG").write_bytes(_jpeg_bytes(arr, quality=quality))
            n += 1
    return n


def _tar_bytes(files: dict[str, bytes], *, gzip: bool = False) -> bytes:
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gzip else "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _meta_mat(wnids: list[str], ids: list[int]) -> bytes:
    """A devkit ``meta.mat``: the leaf synsets (classes) with the given ILSVRC2012_IDs, and one group synset."""
    import scipy.io
    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images")
    rows = [(i, w, f"thing {w}, other name", "a thing", 0, np.zeros(0), 0, 3) for w, i in zip(wnids, ids)]
    rows.append((len(wnids) + 1, "n00001740", "entity", "the root", 2, np.array(ids[:2]), 3, 0))
    synsets = np.empty(len(rows), dtype=[(f, object) for f in fields])
    for k, row in enumerate(rows):
        synsets[k] = row
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    return buf.getvalue()


def make_ilsvrc_forms(base: str | os.PathLike, *, num_classes: int = 3, train_per_class: int = 3,
                      val_per_class: int = 2, seed: int = 0) -> dict:
    """One miniature ImageNet (the same JPEG bytes, plus one truncated train file) in the four forms ImageNet
    comes in, under ``base``: ``imagefolder/`` (train/<wnid>, val/<wnid>), ``devkit/`` (flat val/ +
    ILSVRC2012_devkit_t12/), ``kaggle/`` (ILSVRC/Data/CLS-LOC + LOC_*), ``tars/`` (the ILSVRC2012 tars, inner
    tars' members in shuffled order). The devkit's ILSVRC2012_IDs run against sorted-wnid order.
    Returns {"wnids", "train", "val": {split: per-class good counts}, "rejects": train rejects}."""
    base = Path(base)
    rng = np.random.default_rng(seed)
    wnids = [f"n0{1440764 + 9973 * i:07d}" for i in range(num_classes)]
    train: dict[str, dict[str, bytes]] = {}
    for c, w in enumerate(wnids):
        numbers = rng.choice(99999, size=train_per_class, replace=False) + 1
        train[w] = {f"{w}_{n}.JPEG": _jpeg_bytes(synth_image(rng, c, *size))
                    for n, size in zip(numbers, _sizes(rng, train_per_class, (24, 48)))}
    truncated = _jpeg_bytes(synth_image(rng, 0, 32, 32))
    train[wnids[0]][f"{wnids[0]}_0.JPEG"] = truncated[: len(truncated) // 2]
    val_labels = rng.permutation(np.repeat(np.arange(num_classes), val_per_class))
    val = {f"ILSVRC2012_val_{n:08d}.JPEG": (wnids[c], _jpeg_bytes(synth_image(rng, c, *size)))
           for n, (c, size) in enumerate(zip(val_labels, _sizes(rng, len(val_labels), (24, 48))), 1)}
    ids = list(range(num_classes, 0, -1))  # the devkit's ids are not sorted-wnid order
    id_of = dict(zip(wnids, ids))
    truth = "".join(f"{id_of[w]}\n" for w, _ in val.values()).encode()
    meta = _meta_mat(wnids, ids)
    names = "".join(f"{w} thing {w}, other name\n" for w in wnids).encode()
    kaggle_csv = "ImageId,PredictionString\n" + "".join(f"{Path(n).stem},{w} 1 2 20 20 {w} 3 3 9 9 \n"
                                                          for n, (w, _) in val.items())

    def put(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    for form, train_dir in (("imagefolder", "train"), ("devkit", "train"), ("kaggle", "ILSVRC/Data/CLS-LOC/train")):
        for w, files in train.items():
            for name, data in files.items():
                put(base / form / train_dir / w / name, data)
    for name, (w, data) in val.items():
        put(base / "imagefolder" / "val" / w / name, data)
        put(base / "devkit" / "val" / name, data)
        put(base / "kaggle" / "ILSVRC" / "Data" / "CLS-LOC" / "val" / name, data)
    put(base / "devkit" / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt", truth)
    put(base / "devkit" / "ILSVRC2012_devkit_t12" / "data" / "meta.mat", meta)
    put(base / "kaggle" / "LOC_val_solution.csv", kaggle_csv.encode())
    put(base / "kaggle" / "LOC_synset_mapping.txt", names)
    inner = {}
    for w, files in train.items():
        shuffled = list(files.items())
        rng.shuffle(shuffled)
        inner[f"{w}.tar"] = _tar_bytes(dict(shuffled))
    put(base / "tars" / "ILSVRC2012_img_train.tar", _tar_bytes(inner))
    put(base / "tars" / "ILSVRC2012_img_val.tar", _tar_bytes({n: data for n, (_, data) in val.items()}))
    put(base / "tars" / "ILSVRC2012_devkit_t12.tar.gz", _tar_bytes(
        {"ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": truth,
         "ILSVRC2012_devkit_t12/data/meta.mat": meta}, gzip=True))
    return {"wnids": wnids, "train": [train_per_class] * num_classes,
            "val": [val_per_class] * num_classes, "rejects": 1}
