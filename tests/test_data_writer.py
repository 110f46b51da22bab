"""datasets/write_ffcv.py: the three layouts, bad files, manifest, verify, errors (real FFCV writer)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.train.factory import FIRST_USE_LOCK
from ssal_datasets import write_ffcv
from ssal_datasets.files import exclusive_lock
from ssal_datasets.manifest import ManifestError, class_names, read_manifest, superclasses
from ssal_datasets.synth import make_imagenet_tree, make_tiny_tree
from ssal_datasets.writer import WRITE_LOCK

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "datasets" / "write_ffcv.py"
BAD = {("train", 0): ["cmyk", "truncated"], ("train", 1): ["gray", "empty"], ("train", 2): ["png"],
       ("val", 1): ["truncated", "cmyk"]}
#: a demo set of 4 classes in 2 super-classes, 3 + 1 images each: seconds to write
TINY_DEMO = ["--num-classes", "4", "--num-superclasses", "2", "--images-per-class", "3", "--val-images-per-class",
             "1", "--image-size", "32", "--workers", "1"]


def run_cli(argv, capsys):
    rc = write_ffcv.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str) -> list[str]:
    """The error lines of stderr (progress bars may precede them); the error must be the last line."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("write_ffcv.py:") and " warning: " not in line]
    assert not errors or lines[-1] == errors[-1], err
    return errors


def beton_fields(path):
    from ffcv.reader import Reader
    r = Reader(str(path))
    f = {name: f"f{i}" for i, name in enumerate(r.field_names)}
    return r, np.asarray(r.metadata[f["label"]]).reshape(-1), np.asarray(r.metadata[f["index"]]).reshape(-1)


def read_rejects(out: Path) -> list[list[str]]:
    lines = (out / "rejects.txt").read_text().splitlines()
    assert lines[0].startswith("#")
    return [line.split("\t") for line in lines[1:]]


@pytest.fixture(scope="module")
def imagenet_written(tmp_path_factory):
    base = tmp_path_factory.mktemp("imagenet")
    info = make_imagenet_tree(base / "src", num_classes=3, train_per_class=5, val_per_class=2, bad=BAD)
    rc = write_ffcv.main(["imagenet", "--root", str(base / "src"), "--out", str(base / "out"), "--workers", "2"])
    return base, info, rc


def test_imagenet_layout_with_bad_files(imagenet_written):
    base, info, rc = imagenet_written
    out = base / "out"
    assert rc == 0
    m = read_manifest(out)
    assert m["dataset"] == "imagenet" and m["num_classes"] == 3
    assert [c["wnid"] for c in m["classes"]] == sorted(info["wnids"])
    assert class_names(m) == info["wnids"]  # no names file: names fall back to wnids
    for split in ("train", "val"):
        s = m["splits"][split]
        assert s["per_class"] == info["expected"][split]
        assert s["rejected"] == info["rejects"][split]
        assert s["count"] + s["rejected"] == s["found"]
        r, labels, index = beton_fields(out / s["beton"])
        assert r.num_samples == s["count"]
        assert np.bincount(labels, minlength=3).tolist() == s["per_class"]
        assert index.tolist() == list(range(s["count"]))
        assert sorted(r.field_names) == ["image", "index", "label"]
    rejects = read_rejects(out)
    assert len(rejects) == sum(info["rejects"].values())
    reasons = {Path(p).name: (split, why) for split, p, why in rejects}
    assert any("truncated" in why for _, why in reasons.values())
    assert any("empty" in why for _, why in reasons.values())
    assert all("_truncated" in n or "_empty" in n for n in reasons)  # CMYK, gray, PNG-as-JPEG were converted
    assert m["writer"]["write_mode"] == "proportion" and m["writer"]["max_resolution"] == 500
    assert m["source_root"] == str((base / "src").resolve())
    assert [p for p in os.listdir(out) if p.startswith(".")] == [WRITE_LOCK]  # no temporary files left


def test_verify_ok_then_detects_corruption(imagenet_written, capsys, tmp_path):
    base, _, _ = imagenet_written
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(base / "out", out)
    rc, stdout, _ = run_cli(["verify", "--out", out], capsys)
    assert rc == 0 and "OK" in stdout
    beton = out / "train.beton"
    data = bytearray(beton.read_bytes())
    data[len(data) // 2] ^= 0xFF
    beton.write_bytes(bytes(data))
    rc, _, err = run_cli(["verify", "--out", out], capsys)
    assert rc == 1
    assert "train.beton" in err and "sha256" in err
    beton.write_bytes(bytes(data[:1000]))  # truncated beton
    rc, _, err = run_cli(["verify", "--out", out], capsys)
    assert rc == 1 and "train.beton" in err
    (out / "val.beton").unlink()
    rc, _, err = run_cli(["verify", "--out", out], capsys)
    assert rc == 1 and "val.beton: missing" in err


def test_existing_output_needs_overwrite(imagenet_written, capsys):
    base, _, _ = imagenet_written
    argv = ["imagenet", "--root", base / "src", "--out", base / "out", "--workers", "1"]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2
    lines = error_line(err)
    assert len(lines) == 1 and "--overwrite" in lines[0] and "already holds" in lines[0]


def test_overwrite_and_subset(imagenet_written, capsys, tmp_path):
    base, info, _ = imagenet_written
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    rc, _, _ = run_cli(["imagenet", "--root", base / "src", "--out", out, "--overwrite", "--subset", "2",
                        "--workers", "1", "--write-mode", "jpg", "--max-resolution", "32"], capsys)
    assert rc == 0
    m = read_manifest(out)
    # first 2 files (by name) per class; the bad files sort after the good ones
    assert m["splits"]["train"]["per_class"] == [2, 2, 2]
    assert m["splits"]["train"]["rejected"] == 0
    assert m["writer"]["subset"] == 2 and m["writer"]["write_mode"] == "jpg"
    r, _, _ = beton_fields(out / "train.beton")
    f = {name: f"f{i}" for i, name in enumerate(r.field_names)}
    meta = r.metadata[f["image"]]
    assert max(meta["width"].max(), meta["height"].max()) <= 32


def test_tinyimagenet_layout(tmp_path, capsys):
    bad = {("train", 0): ["truncated", "gray"], ("val", 2): ["empty", "png"]}
    info = make_tiny_tree(tmp_path / "tiny", num_classes=3, train_per_class=4, val_per_class=2, bad=bad)
    # an extra unlabelled val file and a missing annotated file are listed, not lost
    from ssal_datasets.synth import write_image
    write_image(tmp_path / "tiny" / "val" / "images" / "zz_unlabelled.JPEG", np.random.default_rng(1), 0, (64, 64))
    with open(tmp_path / "tiny" / "val" / "val_annotations.txt", "a") as f:
        f.write(f"gone.JPEG\t{info['wnids'][0]}\t0\t0\t1\t1\n")
    rc, stdout, _ = run_cli(["tinyimagenet", "--root", tmp_path / "tiny", "--out", tmp_path / "out",
                             "--workers", "1"], capsys)
    assert rc == 0
    assert "test" in stdout and "skipped" in stdout
    m = read_manifest(tmp_path / "out")
    assert m["dataset"] == "tinyimagenet"
    assert [c["wnid"] for c in m["classes"]] == info["wnids"]
    assert class_names(m)[0].startswith("thing ")
    assert m["splits"]["train"]["per_class"] == info["expected"]["train"]
    assert m["splits"]["val"]["per_class"] == info["expected"]["val"]
    assert m["splits"]["train"]["rejected"] == info["rejects"]["train"]
    assert m["splits"]["val"]["rejected"] == info["rejects"]["val"] + 2
    reasons = [why for _, _, why in read_rejects(tmp_path / "out")]
    assert any("no label" in r for r in reasons) and any("missing" in r for r in reasons)
    for split in ("train", "val"):
        s = m["splits"][split]
        assert s["count"] + s["rejected"] == s["found"]
        _, labels, _ = beton_fields(tmp_path / "out" / s["beton"])
        assert np.bincount(labels, minlength=3).tolist() == s["per_class"]


def test_demo_writer(tmp_path, capsys):
    argv = ["demo", "--out", tmp_path / "demo", "--num-classes", "6", "--num-superclasses", "2",
            "--images-per-class", "5", "--val-images-per-class", "2", "--image-size", "32", "--workers", "1",
            "--seed", "3", "--keep-jpegs", tmp_path / "jpegs"]
    rc, _, _ = run_cli(argv, capsys)
    assert rc == 0
    m = read_manifest(tmp_path / "demo")
    assert m["dataset"] == "demo" and m["seed"] == 3 and m["num_superclasses"] == 2
    sc = superclasses(m)
    assert sorted(sc) == [0, 0, 0, 1, 1, 1]
    assert all(c["superclass_name"] for c in m["classes"])
    assert m["splits"]["train"]["per_class"] == [5] * 6 and m["splits"]["val"]["per_class"] == [2] * 6
    jpegs = sorted((tmp_path / "jpegs").rglob("*.JPEG"))
    assert len(jpegs) == 6 * 7
    # deterministic from the seed: a second generation gives byte-identical JPEGs
    rc, _, _ = run_cli(argv[:-2] + ["--keep-jpegs", tmp_path / "jpegs2", "--out", tmp_path / "demo2"], capsys)
    assert rc == 0
    again = sorted((tmp_path / "jpegs2").rglob("*.JPEG"))
    assert [p.read_bytes() for p in jpegs] == [p.read_bytes() for p in again]
    assert read_manifest(tmp_path / "demo2")["classes"] == m["classes"]


def test_a_second_writer_of_a_folder_stops_and_leaves_the_first_ones_files(tmp_path, capsys):
    """While a writer works in --out (here: this test holds the folder's lock), another write_ffcv into it
    stops with one line naming the holder, exit 2, and leaves the first writer's temporaries alone (it used
    to delete them as leftovers, failing both). Once the folder is free, a write goes through."""
    out = tmp_path / "demo"
    argv = ["demo", "--out", out, *TINY_DEMO]
    live = [out / ".demo-src-live" / "a.JPEG", out / f".train.beton.tmp-{os.getpid()}"]
    for path in live:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"being written")
    with exclusive_lock(out / WRITE_LOCK, wait=False):
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2, err
        assert error_line(err) == [f"write_ffcv.py: error: --out {out}: pid {os.getpid()} is writing this folder "
                                   "now; wait for it to end or choose another --out"]
        assert all(path.read_bytes() == b"being written" for path in live)
        assert not (out / "manifest.json").exists()
    rc, _, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert read_manifest(out)["splits"]["train"]["per_class"] == [3] * 4
    assert not any(path.exists() for path in live)  # stale now that nobody holds the folder: cleaned


def test_runs_started_together_take_turns_writing_the_demo_set(tmp_path, capsys):
    """A run whose demo data.root is missing while another run writes it there (here: this test holds
    the first-use lock, then writes a small demo set) waits, says so, and then uses that set instead of
    writing its own over it."""
    root, log = tmp_path / "demo", tmp_path / "run.log"
    code = ("from pipeline.train.config import load_config; from pipeline.train.dist import DistInfo; "
            "from pipeline.train.factory import ensure_dataset; "
            f"print('root', ensure_dataset(load_config(None, ['data.root={root}']), DistInfo()))")
    with exclusive_lock(root / FIRST_USE_LOCK, wait=False), open(log, "w") as out:
        run = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 120
        while "waiting" not in log.read_text() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert log.read_text().strip() == f"demo dataset missing: pid {os.getpid()} is writing it to {root}; waiting"
        rc, _, err = run_cli(["demo", "--out", root, *TINY_DEMO], capsys)
        assert rc == 0, err
    assert run.wait(timeout=120) == 0, log.read_text()
    assert log.read_text().strip().splitlines()[1:] == [f"root {root}"]  # no "writing it" line: not rewritten
    assert read_manifest(root)["splits"]["train"]["per_class"] == [3] * 4


def test_demo_render_is_hierarchical():
    """Classes of one super-class share shape + hue; the fine cue is the stripe frequency."""
    from ssal_datasets.demo import DemoSpec, class_table
    spec = DemoSpec(num_classes=12, num_superclasses=4, seed=1)
    table = class_table(spec)
    assert sorted(t["superclass"] for t in table) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [t["superclass"] for t in table] != sorted(t["superclass"] for t in table)  # seeded permutation
    for s in range(4):
        assert sorted(t["fine"] for t in table if t["superclass"] == s) == [0, 1, 2]


@pytest.mark.parametrize("case", ["missing_root", "not_a_layout", "empty_class", "tiny_as_imagenet",
                                  "loose_val", "all_bad_class", "imagenet_as_tiny", "verify_no_manifest",
                                  "bad_knob"])
def test_errors_are_one_line(case, tmp_path, capsys):
    out = tmp_path / "out"
    root = tmp_path / "src"
    cmd = "imagenet"
    if case == "missing_root":
        root = tmp_path / "nope"
    elif case == "not_a_layout":
        (root / "stuff").mkdir(parents=True)
    elif case == "empty_class":
        make_imagenet_tree(root, num_classes=2, train_per_class=2, val_per_class=1)
        (root / "train" / "n99999999").mkdir()
    elif case == "tiny_as_imagenet":
        make_tiny_tree(root, num_classes=2, train_per_class=1, val_per_class=1)
    elif case == "loose_val":
        make_imagenet_tree(root, num_classes=2, train_per_class=2, val_per_class=1)
        (root / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"x")
    elif case == "all_bad_class":
        info = make_imagenet_tree(root, num_classes=2, train_per_class=0, val_per_class=1,
                                  bad={("train", 0): ["empty"], ("train", 1): ["truncated"]})
        assert info["expected"]["train"] == [0, 0]
    elif case == "imagenet_as_tiny":
        make_imagenet_tree(root, num_classes=2, train_per_class=1, val_per_class=1)
        cmd = "tinyimagenet"
    elif case == "bad_knob":
        make_imagenet_tree(root, num_classes=2, train_per_class=1, val_per_class=1)
    if case == "verify_no_manifest":
        out.mkdir()
        argv = ["verify", "--out", out]
    else:
        argv = [cmd, "--root", root, "--out", out, "--workers", "1"]
        if case == "bad_knob":
            argv += ["--jpeg-quality", "0"]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2, err
    lines = error_line(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("write_ffcv.py: error: ")
    assert not (out / "train.beton").exists() and not (out / "manifest.json").exists()
    if case == "empty_class":
        assert "n99999999" in lines[0] and "no images" in lines[0]


def test_script_help_and_exit_code(tmp_path):
    """Run as a file: --help explains every sub-command and knob; errors exit != 0 with one line."""
    env = {**os.environ, "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0
    for sub in ("imagenet", "tinyimagenet", "demo", "verify"):
        assert sub in res.stdout
    res = subprocess.run([sys.executable, str(SCRIPT), "imagenet", "--help"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    for knob in ("--max-resolution", "--jpeg-quality", "--compress-probability", "--write-mode", "--workers",
                 "--subset", "--overwrite", "--root", "--out"):
        assert knob in res.stdout
    res = subprocess.run([sys.executable, str(SCRIPT), "imagenet", "--root", str(tmp_path / "none"), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [f"write_ffcv.py: error: --root {tmp_path / 'none'}: no such directory"]


def test_read_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)
    good = {"dataset": "demo", "num_classes": 1, "classes": [{"index": 0, "wnid": "a", "name": "a"}],
            "splits": {"train": {"beton": "train.beton", "count": 2, "per_class": [2], "rejected": 1,
                                 "found": 4, "sha256": "x"}}}
    (tmp_path / "manifest.json").write_text(json.dumps(good))
    with pytest.raises(ManifestError, match="found"):
        read_manifest(tmp_path)
