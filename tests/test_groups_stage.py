"""pipeline/groups.py: the grouping stage CLI on synthetic confusion matrices (no training)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline.stages import groups
from pipeline.train.config import REPO_ROOT


def block_confusion(num_classes=16, blocks=4, seed=0, chain=True):
    """Counts where every class is confused only with its neighbours inside its block (a sparse, chain-like
    confusion: many distances tie at 1, the case the restarts are for); block b = classes perm[b::blocks]."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_classes)
    truth = np.empty(num_classes, dtype=int)
    conf = np.zeros((num_classes, num_classes))
    for b in range(blocks):
        members = perm[b::blocks]
        truth[members] = b
        for i, c in enumerate(members):
            conf[c, c] = 20
            if chain:
                if i + 1 < len(members):
                    conf[c, members[i + 1]] = 5 + rng.integers(0, 3)
                if i > 0:
                    conf[c, members[i - 1]] = 3 + rng.integers(0, 3)
            else:
                conf[c, members] += 2
    return conf, truth


def test_restarts_recover_planted_blocks_on_a_sparse_confusion():
    conf, truth = block_confusion()
    single = [groups.adjusted_rand(truth, groups.best_grouping(conf, 4, "join", s, 1)[0]) for s in range(10)]
    best, stats = groups.best_grouping(conf, 4, "join", 0, 10)
    assert groups.adjusted_rand(truth, best) == pytest.approx(1.0)
    assert stats["within_group_confusion"] == pytest.approx(1.0) and len(stats["restart_scores"]) == 10
    assert max(single) == pytest.approx(1.0)
    # split keeps confusable classes apart: (almost) no confusion inside groups
    split, st = groups.best_grouping(conf, 4, "split", 0, 10)
    assert st["within_group_confusion"] < 0.2


def test_cli_from_file_writes_readable_json(tmp_path, capsys):
    conf, truth = block_confusion()
    np.save(tmp_path / "c.npy", conf)
    out = tmp_path / "g" / "groups.json"
    rc = groups.main(["--confusion", str(tmp_path / "c.npy"), "--k", "4", "8", "--out", str(out), "--no-mlflow"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "k=4: group sizes 4..4" in text and "group 0:" in text
    data = json.loads(out.read_text())
    assert data["metadata"]["confusion_split"] == "file" and data["metadata"]["k"] == [4, 8]
    assert [g["num_groups"] for g in data["groupings"]] == [4, 8]
    assert all(len(members) == 2 for members in data["groupings"][1]["groups"])
    lines = out.read_text().splitlines()
    assert any(line.strip().startswith('["') for line in lines)  # one group of class names per line


@pytest.mark.parametrize("argv, message", [
    (["--k", "4", "--out", "x.json"], "exactly one of"),
    (["--confusion", "missing.npy", "--k", "4", "--out", "x.json"], "no such file"),
    (["--confusion", "{c}", "--k", "9", "--out", "x.json"], "--k 9"),
    (["--confusion", "{c}", "--k", "4", "--restarts", "0", "--out", "x.json"], "--restarts"),
    (["--confusion", "{bad}", "--k", "2", "--out", "x.json"], "square"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, argv, message):
    np.save(tmp_path / "c.npy", block_confusion()[0])
    np.save(tmp_path / "bad.npy", np.zeros((4, 5)))
    argv = [a.format(c=tmp_path / "c.npy", bad=tmp_path / "bad.npy") for a in argv]
    assert groups.main(argv + ["--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_runs_as_a_file_with_help():
    result = subprocess.run([sys.executable, str(REPO_ROOT / "pipeline" / "groups.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--from-run" in result.stdout and "holdout" in result.stdout


def test_from_run_logs_an_mlflow_run_with_the_artifact(tmp_path):
    """A fake finished run with only confusion_main.npy: val fallback with a warning, tags, artifact, ARI absent."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.store import default_tracking_uri
    from pipeline.tracking.tracker import Tracker

    uri = default_tracking_uri(str(tmp_path / "runs"))
    conf, _ = block_confusion()
    run_dir = tmp_path / "base"
    tracker = Tracker(uri=uri, experiment="g-test", run_dir=str(run_dir))
    tracker.start("baseline", params={"data.root": ""}, tags={"study": "s", "stage": "baseline", "arch": "resnet18"})
    np.save(run_dir / "confusion_main.npy", conf)
    tracker.log_artifact(str(run_dir / "confusion_main.npy"))
    tracker.end("FINISHED")
    out = tmp_path / "groups.json"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "pipeline" / "groups.py"), "--from-run", tracker.run_id,
                             "--tracking-uri", uri, "--k", "4", "--out", str(out), "--tag", "stage=groups"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "VAL confusion" in result.stderr
    meta = json.loads(out.read_text())["metadata"]
    assert meta["confusion_split"] == "val" and meta["source"]["run_id"] == tracker.run_id
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("g-test")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'groups'")
    assert len(runs) == 1 and runs[0].data.tags["source_run"] == tracker.run_id
    assert runs[0].data.tags["study"] == "s" and runs[0].data.tags["confusion_split"] == "val"
    assert "groups.json" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}


# ----------------------------------------------------------------------------- variant, soft matrix, authors' files


def test_cli_variant_authors_matches_the_library_and_is_recorded(tmp_path, capsys):
    from ssal_models.grouping import group_classes

    conf, _ = block_confusion(num_classes=20, blocks=4, chain=False)
    np.save(tmp_path / "c.npy", conf)
    out = tmp_path / "groups.json"
    assert groups.main(["--confusion", str(tmp_path / "c.npy"), "--k", "4", "--variant", "authors", "--restarts", "1",
                        "--out", str(out), "--no-mlflow"]) == 0
    data = json.loads(out.read_text())
    assert data["metadata"]["variant"] == "authors" and "variant authors" in capsys.readouterr().out
    assert data["groupings"][0]["assignment"] == group_classes(conf, 4, "join", variant="authors").tolist()


def write_manifest(root, wnids, names=None):
    names = names or [f"class {w}" for w in wnids]
    split = {"beton": "val.beton", "count": 0, "per_class": [0] * len(wnids), "rejected": 0, "found": 0, "sha256": ""}
    manifest = {"format": 1, "dataset": "imagenet", "num_classes": len(wnids),
                "classes": [{"index": i, "wnid": w, "name": n, "superclass": None, "superclass_name": None}
                            for i, (w, n) in enumerate(zip(wnids, names))],
                "splits": {"val": split}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def authors_file(path, labels):
    """The authors' layout: numpy.savetxt of the labels as floats, one per line (their class order)."""
    np.savetxt(path, np.asarray(labels, dtype=float))
    return path


def test_import_authors_maps_sorted_wnid_order_onto_the_manifest(tmp_path, capsys):
    wnids = ["n05", "n01", "n04", "n02", "n03", "n00"]  # manifest order is not sorted
    root = write_manifest(tmp_path / "data", wnids)
    # the authors' line i = the i-th wnid in sorted order: n00 n01 n02 n03 n04 n05
    first = authors_file(tmp_path / "a.txt", [0, 0, 1, 1, 2, 2])
    second = authors_file(tmp_path / "b.txt", [1, 0, 1, 0, 1, 0])
    out = tmp_path / "groups.json"
    assert groups.main(["--import-authors", str(first), str(second), "--data-root", str(root), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    by_wnid = {"n00": 0, "n01": 0, "n02": 1, "n03": 1, "n04": 2, "n05": 2}
    assert data["groupings"][0]["assignment"] == [by_wnid[w] for w in wnids]
    by_wnid = {"n00": 1, "n01": 0, "n02": 1, "n03": 0, "n04": 1, "n05": 0}
    assert data["groupings"][1]["assignment"] == [by_wnid[w] for w in wnids]
    assert data["groupings"][0]["groups"][0] == ["class n01", "class n00"]  # names, in the manifest's order
    assert data["metadata"]["class_order_of_files"] == "sorted wnids"
    assert "k=3, group sizes 2..2" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    ("0\n1\n0\n1\n0\n", "has 5 lines but the dataset has 6 classes"),
    ("0\n1\n0\n1\n0\n1\n0\n", "has 7 lines"),
    ("0\n1\n0\n1.5\n0\n1\n", "line 4: '1.5' is not a group index"),
    ("0\n1\n0\nbird\n0\n1\n", "line 4: 'bird' is not a number"),
    ("0\n1\n0\n-1\n0\n1\n", "line 4"),
    ("0\n2\n0\n2\n0\n2\n", "no class is in group(s) [1]"),
    ("0\n0\n0\n0\n0\n0\n", "k >= 2"),
])
def test_import_authors_rejects_bad_files_in_one_line(tmp_path, capsys, content, message):
    root = write_manifest(tmp_path / "data", [f"n{i:02d}" for i in range(6)])
    (tmp_path / "bad.txt").write_text(content)
    assert groups.main(["--import-authors", str(tmp_path / "bad.txt"), "--data-root", str(root),
                        "--out", str(tmp_path / "g.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err
    assert not (tmp_path / "g.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--import-authors", "{f}", "--out", "x.json"], "needs --data-root"),
    (["--import-authors", "{f}", "--data-root", "{root}", "--k", "3", "--out", "x.json"], "--k: not used"),
    (["--import-authors", "missing.txt", "--data-root", "{root}", "--out", "x.json"], "no such file"),
])
def test_import_authors_usage_errors(tmp_path, capsys, argv, message):
    root = write_manifest(tmp_path / "data", [f"n{i:02d}" for i in range(6)])
    f = authors_file(tmp_path / "a.txt", [0, 0, 1, 1, 2, 2])
    argv = [a.format(f=f, root=root) for a in argv]
    assert groups.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err


def test_soft_matrix_from_a_run_folder(tmp_path, capsys):
    """--matrix soft reads confusion_soft_holdout.npy of the run; a run without it is one clear line."""
    from pipeline.tracking.store import default_tracking_uri
    from pipeline.tracking.tracker import Tracker

    uri = default_tracking_uri(str(tmp_path / "runs"))
    conf, truth = block_confusion(num_classes=16, blocks=4, chain=False)
    soft = conf / conf.sum(axis=1, keepdims=True)
    run_dir = tmp_path / "base"
    tracker = Tracker(uri=uri, experiment="g-test", run_dir=str(run_dir))
    tracker.start("baseline", params={"data.root": ""}, tags={})
    np.save(run_dir / "confusion_holdout.npy", np.eye(16) * 4)  # a hard matrix with no confusion at all
    np.save(run_dir / "confusion_soft_holdout.npy", soft)
    (run_dir / "mlflow_run_id").write_text(tracker.run_id)
    tracker.end("FINISHED")
    out = tmp_path / "groups.json"
    argv = ["--from-run-dir", str(run_dir), "--tracking-uri", uri, "--k", "4", "--out", str(out), "--no-mlflow"]
    assert groups.main(argv + ["--matrix", "soft"]) == 0
    meta = json.loads(out.read_text())["metadata"]
    assert meta["matrix"] == "soft" and meta["confusion_split"] == "holdout"
    assert groups.adjusted_rand(truth, np.array(json.loads(out.read_text())["groupings"][0]["assignment"])) == 1.0
    (run_dir / "confusion_soft_holdout.npy").unlink()
    assert groups.main(argv + ["--matrix", "soft", "--split", "holdout"]) == 2
    assert "use --matrix hard" in capsys.readouterr().err


def _seeded_run(tmp_path, uri, seed, soft, hard):
    from pipeline.tracking.tracker import Tracker

    run_dir = tmp_path / f"base.seed{seed}"
    tracker = Tracker(uri=uri, experiment="g-test", run_dir=str(run_dir))
    tracker.start(f"baseline.seed{seed}", params={"data.root": "", "train.seed": seed}, tags={})
    np.save(run_dir / "confusion_holdout.npy", hard)
    np.save(run_dir / "confusion_soft_holdout.npy", soft)
    (run_dir / "mlflow_run_id").write_text(tracker.run_id)
    tracker.end("FINISHED")
    return run_dir


def _manifest(root, superclass):
    root.mkdir()
    count = len(superclass)
    split = {"beton": "train.beton", "count": count, "per_class": [1] * count, "rejected": 0, "found": count,
             "sha256": ""}
    classes = [{"index": i, "wnid": f"c{i}", "name": f"class{i}", "superclass": int(s)}
               for i, s in enumerate(superclass)]
    (root / "manifest.json").write_text(json.dumps({"dataset": "demo", "num_classes": count, "classes": classes,
                                                    "splits": {"train": split}}))


def test_seeds_mean_soft_confusion_image_count_and_ari_per_seed(tmp_path, capsys):
    """Several run folders (the seeds of a study stage): the grouping comes from their mean soft confusion,
    each seed's own grouping's ARI is printed and stored, and the image count is that of the hard twins
    (a soft matrix sums to the number of classes)."""
    from pipeline.tracking.store import default_tracking_uri

    uri = default_tracking_uri(str(tmp_path / "runs"))
    conf, truth = block_confusion(num_classes=16, blocks=4, chain=False)
    clean = conf / conf.sum(axis=1, keepdims=True)
    noisy = np.random.default_rng(1).dirichlet(np.ones(16), size=16)  # no block structure at all
    hard = np.eye(16) * 3  # 48 images per run
    dirs = [_seeded_run(tmp_path, uri, 0, clean, hard), _seeded_run(tmp_path, uri, 1, 0.3 * clean + 0.7 * noisy,
                                                                     hard)]
    _manifest(tmp_path / "data", truth)
    out = tmp_path / "groups.json"
    argv = ["--from-run-dir", *map(str, dirs), "--tracking-uri", uri, "--k", "4", "--out", str(out),
            "--matrix", "soft", "--data-root", str(tmp_path / "data")]
    assert groups.main(argv) == 0
    printed = capsys.readouterr().out
    meta = json.loads(out.read_text())["metadata"]
    assert meta["num_samples_in_confusion"] == 96 and "96 images" in printed
    assert [s["seed"] for s in meta["source"]["runs"]] == ["0", "1"]
    per_seed = meta["ari_vs_planted_superclasses_per_seed"]
    assert per_seed["0"]["4"] == 1.0 and per_seed["1"]["4"] < 1.0
    assert meta["ari_vs_planted_superclasses"]["4"] == 1.0  # the mean keeps seed 0's clear blocks
    assert "seed 0 alone: k=4 ARI 1.000" in printed
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    [run] = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
             if r.data.tags.get("method") == "groups"]
    assert run.data.metrics["groups/ari_seed0/k4"] == 1.0 and "groups/ari_seed1/k4" in run.data.metrics
