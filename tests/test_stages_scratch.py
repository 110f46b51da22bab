"""The stage tools end to end on runs whose folder is gone (their files only in MLflow's artifacts, so the
tools download them to a scratch folder): the scratch folders are removed at exit, also on an error, and
the outputs that have no run folder to go to stay in a kept, printed folder. TMPDIR points at a folder of
the test, so every temporary folder the tools make can be counted."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.train.config import REPO_ROOT

SCRATCH = ("groups-*", "report-*", "explain-*", "fit-lc-*")


def run_tool(tool: str, argv, tmp_root: Path, cwd: Path) -> subprocess.CompletedProcess:
    tmp_root.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp_root))
    return subprocess.run([sys.executable, str(REPO_ROOT / "pipeline" / f"{tool}.py"), *map(str, argv)],
                          capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def scratch_left(tmp_root: Path) -> list[str]:
    return sorted(p.name for pattern in SCRATCH for p in tmp_root.glob(pattern))


def logged_without_folder(uri, tmp_path, name, files, params=None, tags=None) -> str:
    """A FINISHED run whose files are artifacts only: its run folder is deleted after logging."""
    from pipeline.tracking.tracker import Tracker

    run_dir = tmp_path / name
    tracker = Tracker(uri=uri, experiment="scratch", run_dir=str(run_dir))
    tracker.start(name, params=params or {}, tags=tags or {})
    for file_name, write in files.items():
        write(run_dir / file_name)
        tracker.log_artifact(str(run_dir / file_name))
    tracker.end("FINISHED")
    shutil.rmtree(run_dir)
    return tracker.run_id


def log_ssal_run(uri, tmp_path, name, weights_width=0.125) -> str:
    """A tiny SSAL model (8 classes, one branch of 2 groups, width 0.125) logged as config.yaml +
    final_weights.pt (of a model ``weights_width`` wide), no dataset on this machine (the tools take the
    sizes from the weights)."""
    import torch

    from pipeline.train.config import load_config, save_config
    from pipeline.train.factory import build_model

    overrides = ["method.num_groups=[2]", f"data.root={tmp_path / 'no-data'}"]
    demo = REPO_ROOT / "configs" / "demo.yaml"
    cfg = load_config(demo, overrides + ["model.width_multiplier=0.125"])
    torch.manual_seed(0)
    weights_cfg = load_config(demo, overrides + [f"model.width_multiplier={weights_width}"])
    model = build_model(weights_cfg, 8, [np.arange(8) % 2])
    files = {"config.yaml": lambda path: save_config(cfg, path),
             "final_weights.pt": lambda path: torch.save(model.state_dict(), path)}
    return logged_without_folder(uri, tmp_path, name, files, params={"model.arch": cfg.model.arch},
                                 tags={"study": "scratch", "stage": name, "method": "ssal"})


@pytest.fixture
def uri(tmp_path):
    from pipeline.tracking.store import default_tracking_uri

    return default_tracking_uri(str(tmp_path / "runs"))


def test_groups_from_a_run_without_folder_leaves_no_scratch(uri, tmp_path):
    confusion = np.kron(np.eye(4), np.ones((4, 4))) + 20 * np.eye(16)
    run_id = logged_without_folder(uri, tmp_path, "base", {"confusion_holdout.npy": lambda p: np.save(p, confusion)})
    out = tmp_path / "groups.json"
    result = run_tool("groups", ["--from-run", run_id, "--tracking-uri", uri, "--k", "4", "--out", out],
                      tmp_path / "tmp", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(out.read_text())["metadata"]["confusion_split"] == "holdout"  # read from the download
    assert scratch_left(tmp_path / "tmp") == []


def test_report_and_explain_keep_outputs_and_remove_scratch(uri, tmp_path):
    run_id = log_ssal_run(uri, tmp_path, "ssal")
    tmp_root = tmp_path / "tmp"
    report_out = tmp_path / "report"
    report = run_tool("report", ["--study", "scratch", "--tracking-uri", uri, "--out", report_out], tmp_root, tmp_path)
    assert report.returncode == 0, report.stderr[-2000:]
    row = next(line for line in (report_out / "report.md").read_text().splitlines() if line.startswith("| ssal |"))
    assert row.split("|")[-4].strip() not in ("", "0.00")  # params (M): the downloaded weights were read
    assert scratch_left(tmp_root) == []

    Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(tmp_path / "x.png")
    explain = run_tool("explain", ["--run", run_id, "--tracking-uri", uri, "--images", tmp_path / "x.png"],
                       tmp_root, tmp_path)
    assert explain.returncode == 0, explain.stderr[-2000:]
    saved = Path(next(line for line in explain.stdout.splitlines() if line.startswith("saved ")).split()[1].rstrip(":"))
    assert saved.name == "cams.png" and saved.parent.parent == tmp_root and saved.parent.name.startswith("cams-")
    assert Image.open(saved).size[0] > 100  # the figure, kept
    assert scratch_left(tmp_root) == []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    cams_run = client.search_runs([client.get_experiment_by_name("scratch").experiment_id], "tags.stage = 'explain'")
    assert [a.path for a in client.list_artifacts(cams_run[0].info.run_id)] == ["cams.png"]


def test_scratch_is_removed_when_the_tool_fails(uri, tmp_path):
    """Weights that do not fit the run's config: one line, exit 2, after the download; no scratch left."""
    run_id = log_ssal_run(uri, tmp_path, "misfit", weights_width=0.25)
    tmp_root = tmp_path / "tmp"
    for tool, argv in (("explain", ["--images", tmp_path / "x.png"]), ("fit_lc", [])):
        bad = run_tool(tool, ["--run", run_id, "--tracking-uri", uri, "--no-mlflow", *argv], tmp_root, tmp_path)
        assert bad.returncode == 2 and "error: the run's weights do not fit its config" in bad.stderr, bad.stderr
        assert scratch_left(tmp_root) == [] and not list(tmp_root.glob("cams-*")) and not list(tmp_root.glob("lc-*"))


def test_every_tool_takes_the_same_mlflow_options():
    from pipeline.stages import explain, fit_lc, groups, report

    given = ["--tracking-uri", "sqlite:///x.db", "--runs-root", "r", "--experiment", "e", "--run-name", "n",
             "--tag", "a=b", "--no-mlflow"]
    expected = {"tracking_uri": "sqlite:///x.db", "runs_root": "r", "experiment": "e", "run_name": "n",
                "tag": ["a=b"], "no_mlflow": True}
    for tool, required in ((groups, ["--out", "g.json"]), (fit_lc, []), (explain, []), (report, ["--study", "s"])):
        parsed, rest = tool.build_parser().parse_known_args(required + given)
        assert rest == [] and {k: getattr(parsed, k) for k in expected} == expected, tool.__name__


@pytest.mark.slow
def test_fit_lc_and_explain_without_run_folder_keep_their_outputs(demo_study, tmp_path, uri):
    """The demo study's SSAL run, its files re-logged as artifacts of a run in a fresh store whose folder is
    gone: +LC head and CAMs land in kept lc-* / cams-* folders (with the tool's MLflow journal), no scratch."""
    assert demo_study.rc == 0, demo_study.out[-3000:]
    trained = demo_study.runs_root / "studies" / "ci" / "ssal1"
    files = {name: (lambda path, name=name: shutil.copy(trained / name, path))
             for name in ("config.yaml", "final_weights.pt")}
    run_id = logged_without_folder(uri, tmp_path, "ssal1", files, tags={"study": "scratch", "stage": "ssal1"})
    tmp_root = tmp_path / "tmp"
    lc = run_tool("fit_lc", ["--run", run_id, "--tracking-uri", uri, "--epochs", "1", "--max-samples", "32"],
                  tmp_root, tmp_path)
    assert lc.returncode == 0, lc.stderr[-3000:]
    (head,) = tmp_root.glob("lc-*/lc_head.pt")
    assert f"head: {head}" in lc.stdout
    explain = run_tool("explain", ["--run", run_id, "--tracking-uri", uri, "--num-images", "2"], tmp_root, tmp_path)
    assert explain.returncode == 0, explain.stderr[-3000:]
    (cams,) = tmp_root.glob("cams-*/cams.png")
    assert f"saved {cams}" in explain.stdout
    assert scratch_left(tmp_root) == []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("scratch").experiment_id
    logged = client.search_runs([experiment], f"tags.source_run = '{run_id}'")
    assert sorted(r.data.tags["stage"] for r in logged) == ["explain", "lc"]
    assert all(r.info.status == "FINISHED" for r in logged)
