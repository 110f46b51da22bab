"""pipeline/groups.py: the grouping stage CLI on synthetic confusion matrices (no training)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline import groups
from pipeline.config import REPO_ROOT


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

    from pipeline.tracking import Tracker, default_tracking_uri

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
