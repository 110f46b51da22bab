"""write_ffcv.py imagenet: ImageNet as it comes (ImageFolder, devkit, Kaggle, the ILSVRC2012 tars read in place)
gives the same betons; the known-count warning; one-line errors (real FFCV writer and reader)."""
from __future__ import annotations

import contextlib
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from ssal_datasets import write_ffcv
from ssal_datasets.imagenet_layouts import LAYOUTS_LOOKED_FOR
from ssal_datasets.manifest import read_manifest
from ssal_datasets.synth import make_ilsvrc_forms
from ssal_datasets.tars import TarMember

FORMS = {"imagefolder": "imagefolder", "devkit": "devkit", "kaggle": "kaggle", "tars": "ilsvrc-tars"}


def write(argv, capsys):
    rc = write_ffcv.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def beton_samples(path):
    """(labels, images) of a beton read back with FFCV's Reader: raw pixels as stored, JPEGs decoded."""
    from ffcv.reader import Reader
    r = Reader(str(path))
    f = {name: f"f{i}" for i, name in enumerate(r.field_names)}
    sizes = dict(zip(r.alloc_table["ptr"].tolist(), r.alloc_table["size"].tolist()))
    images = []
    data = np.fromfile(path, dtype=np.uint8)
    for meta in r.metadata[f["image"]]:
        ptr, h, w = int(meta["data_ptr"]), int(meta["height"]), int(meta["width"])
        if meta["mode"] == 1:  # raw
            images.append(data[ptr:ptr + h * w * 3].reshape(h, w, 3))
        else:
            images.append(np.asarray(Image.open(io.BytesIO(data[ptr:ptr + sizes[ptr]].tobytes())).convert("RGB")))
    return np.asarray(r.metadata[f["label"]]).reshape(-1), images


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The miniature ImageNet in its four forms, each written to out-<form>; {form: (exit status, stderr)}."""
    base = tmp_path_factory.mktemp("ilsvrc")
    info = make_ilsvrc_forms(base / "src", num_classes=3, train_per_class=4, val_per_class=2)
    results = {}
    for form in FORMS:
        err = io.StringIO()
        out = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = write_ffcv.main(["imagenet", "--root", str(base / "src" / form), "--out", str(base / f"out-{form}"),
                                  "--workers", "2"])
        results[form] = rc, err.getvalue(), out.getvalue()
    return base, info, results


@pytest.mark.parametrize("form", list(FORMS))
def test_each_form_is_found_and_written(form, written):
    base, info, results = written
    out = base / f"out-{form}"
    rc, err, printed = results[form]
    assert rc == 0, err
    assert f"layout: {FORMS[form]}" in printed.splitlines()
    m = read_manifest(out)
    assert m["layout"] == FORMS[form] and m["dataset"] == "imagenet"
    assert [c["wnid"] for c in m["classes"]] == info["wnids"]
    assert m["splits"]["train"]["per_class"] == info["train"] and m["splits"]["train"]["rejected"] == info["rejects"]
    assert m["splits"]["val"]["per_class"] == info["val"] and m["splits"]["val"]["rejected"] == 0
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert warnings == [f"write_ffcv.py: warning: ImageNet-1k has 1,281,167 train / 50,000 val images in 1,000 "
                        f"classes; {(base / 'src' / form).resolve()} has 13 train / 6 val in 3 classes (a subset or "
                        f"an incomplete copy?)"]
    if form in ("devkit", "tars"):  # names from meta.mat
        assert m["classes"][0]["name"] == f"thing {info['wnids'][0]}"


def test_all_forms_write_the_same_labels_and_pixels(written):
    base, info, results = written
    reference = None
    for form in FORMS:
        out = base / f"out-{form}"
        assert results[form][0] == 0, results[form][1]
        betons = {split: beton_samples(out / f"{split}.beton") for split in ("train", "val")}
        if reference is None:
            reference = betons
            assert {split: np.bincount(labels).tolist() for split, (labels, _) in betons.items()} == \
                {"train": info["train"], "val": info["val"]}
            continue
        for split, (labels, images) in betons.items():
            assert labels.tolist() == reference[split][0].tolist(), (form, split)
            assert len(images) == len(reference[split][1])
            for a, b in zip(images, reference[split][1]):
                assert a.shape == b.shape and np.array_equal(a, b), (form, split)


def test_tar_paths_given_and_devkit_option(written, tmp_path, capsys):
    base, info, _ = written
    tars = base / "src" / "tars"
    rc, _, err = write(["imagenet", "--train-tar", tars / "ILSVRC2012_img_train.tar", "--val-tar",
                        tars / "ILSVRC2012_img_val.tar", "--devkit", base / "src" / "devkit" / "ILSVRC2012_devkit_t12",
                        "--out", tmp_path / "o", "--workers", "1", "--subset", "2"], capsys)
    assert rc == 0, err
    m = read_manifest(tmp_path / "o")
    assert m["layout"] == "ilsvrc-tars" and m["splits"]["train"]["per_class"] == [1, 2, 2]  # first 2 by name
    w = info["wnids"][0]  # its first file by name is the truncated one, named by where it lies
    assert f"train\tILSVRC2012_img_train.tar:{w}.tar:{w}_0.JPEG\ttruncated" in (tmp_path / "o" / "rejects.txt").read_text()


def test_tar_member_is_a_byte_range_of_the_outer_tar(written):
    from ssal_datasets.tars import index_nested_tar
    base, info, _ = written
    path = base / "src" / "tars" / "ILSVRC2012_img_train.tar"
    per_class = index_nested_tar(str(path))
    assert sorted(per_class) == info["wnids"]
    member = per_class[info["wnids"][1]][0]
    assert isinstance(member, TarMember)
    with tarfile.open(path) as outer:
        inner = tarfile.open(fileobj=outer.extractfile(f"{info['wnids'][1]}.tar"))
        assert member.read() == inner.extractfile(member.basename).read()


@pytest.mark.parametrize("case", ["no_layout", "flat_val_without_devkit", "one_tar_only", "bad_ground_truth",
                                  "root_and_tars"])
def test_layout_errors_are_one_line(case, written, tmp_path, capsys):
    import shutil
    base, _, _ = written
    root = tmp_path / "root"
    extra = []
    if case == "no_layout":
        (root / "images").mkdir(parents=True)
        expected = f"no ImageNet layout found; looked for {LAYOUTS_LOOKED_FOR}"
    elif case == "flat_val_without_devkit":
        shutil.copytree(base / "src" / "devkit", root)
        shutil.rmtree(root / "ILSVRC2012_devkit_t12")
        expected = "val/ holds images directly"
    elif case == "one_tar_only":
        root.mkdir()
        shutil.copy(base / "src" / "tars" / "ILSVRC2012_img_train.tar", root)
        expected = "holds the ILSVRC2012 tars but not ILSVRC2012_img_val.tar"
    elif case == "root_and_tars":
        shutil.copytree(base / "src" / "tars", root)
        extra = ["--val-tar", root / "ILSVRC2012_img_val.tar"]
        expected = "give --root DIR or --train-tar / --val-tar, not both"
    else:
        shutil.copytree(base / "src" / "devkit", root)
        (root / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n77\n")
        expected = "ILSVRC2012_validation_ground_truth.txt line 2: '77' is not an ILSVRC2012_ID of meta.mat"
    rc, _, err = write(["imagenet", "--root", root, "--out", tmp_path / "out", "--workers", "1", *extra], capsys)
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("write_ffcv.py: error")]
    assert len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "out").exists()


def test_a_cut_train_tar_is_one_line(written, tmp_path, capsys):
    """A train tar cut inside a class tar (an interrupted download) stops before writing, naming the tar."""
    import shutil
    base, info, _ = written
    root = tmp_path / "root"
    shutil.copytree(base / "src" / "tars", root)
    from ssal_datasets.tars import index_nested_tar
    stored = index_nested_tar(str(root / "ILSVRC2012_img_train.tar"))[info["wnids"][1]]
    with open(root / "ILSVRC2012_img_train.tar", "r+b") as f:
        f.truncate(max(m.offset for m in stored) + 10)  # inside the second class tar's last-stored image
    rc, _, err = write(["imagenet", "--root", root, "--out", tmp_path / "out", "--workers", "1"], capsys)
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("write_ffcv.py: error")]
    assert lines == [f"write_ffcv.py: error: {root.resolve() / 'ILSVRC2012_img_train.tar'}: not a readable tar, cut "
                     f"short or damaged (unexpected end of data); check its size and checksum against the "
                     f"download's"], err
    assert not (tmp_path / "out").exists()
