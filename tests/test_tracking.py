"""pipeline.tracking.tracker against real MLflow stores: SQLite default store, a real `mlflow server`
killed and restarted mid-run, a server that never answers (fallback store + sync), resume."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
from mlflow import MlflowClient

from pipeline.tracking.journal import BUFFER_FILE, FALLBACK_DB
from pipeline.tracking.store import (EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND, default_tracking_uri,
                                     ensure_sqlite_store)
from pipeline.tracking.sync import main as tracking_main
from pipeline.tracking.tracker import NullTracker, Tracker

KEYS = ("val/top1/main", "val/top1/joint", "train/loss")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _epoch_metrics(e):
    return {"val/top1/main": 0.1 + 0.01 * e, "val/top1/joint": 0.12 + 0.01 * e, "train/loss": 2.0 / (e + 1)}


def _assert_every_step_once(client, run_id, steps):
    for key in KEYS:
        hist = client.get_metric_history(run_id, key)
        got = sorted(m.step for m in hist)
        assert got == sorted(steps), f"{key}: steps {got}"
        for m in hist:
            assert m.value == pytest.approx(_epoch_metrics(m.step)[key])


@pytest.fixture
def blackhole():
    """A TCP port that accepts connections (kernel backlog) but never answers: a hung server."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def test_null_tracker_interface():
    t = NullTracker()
    assert t.start("x", {"a": 1}, {}) is None and t.run_url == ""
    t.log_metrics({"a": 1.0}, 0)
    t.log_artifact("/nonexistent")
    t.log_dict({}, "a.json")
    t.set_tags({"a": "b"})
    t.end("FINISHED")


def test_sqlite_default_store_roundtrip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the cwd (./mlruns, ./mlflow.db)
    runs = tmp_path / "runs"
    uri = default_tracking_uri(str(runs))
    assert uri == f"sqlite:///{runs}/mlflow.db" and (runs / "mlflow.db").exists()
    run_dir = runs / "run1"
    t = Tracker(uri, "study-a", str(run_dir))
    long_val = "g" * 10_000
    params = {"optim.lr": 0.1, "model.arch": "resnet18", "method.groups": long_val,
              "data.crop": [160, 192], "train.amp": None}
    rid = t.start("run1", params, {"method": "ssal", "arch": "resnet18"})
    assert rid and t.run_id == rid
    for e in range(3):
        t.log_metrics(_epoch_metrics(e), step=e)
    t.log_dict({"a": 1, "b": [1, 2]}, "config/resolved.yaml")
    t.log_dict({"groups": [[0, 1], [2]]}, "groupings.json")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    t.log_figure(fig, "plots/acc.png")
    plt.close(fig)
    weights = tmp_path / "final.pt"
    weights.write_bytes(b"\0" * 1000)
    t.log_artifact(str(weights), "model")
    t.set_tags({"git_commit": "abc123"})
    t.end("FINISHED")
    assert t.run_url == (f"mlflow ui --backend-store-uri {uri}  then open "
                         f"http://127.0.0.1:5000/#/experiments/{t.experiment_id}/runs/{rid}?workflowType=machine_learning")

    c = MlflowClient(uri)
    assert c.get_experiment(t.experiment_id).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT_KIND
    run = c.get_run(rid)
    assert run.info.status == "FINISHED" and run.info.run_name == "run1"
    p = run.data.params
    assert p["optim.lr"] == "0.1" and p["data.crop"] == "[160, 192]" and p["train.amp"] == "None"
    assert len(p["method.groups"]) == 6000 and p["method.groups"].endswith("[truncated]")
    assert run.data.tags["tracking.truncated_params"] == "method.groups"
    assert run.data.tags["method"] == "ssal" and run.data.tags["git_commit"] == "abc123"
    _assert_every_step_once(c, rid, range(3))
    arts = {a.path for a in c.list_artifacts(rid)}
    assert {"params_full.json", "groupings.json", "config", "plots", "model"} <= arts
    art_dir = run.info.artifact_uri.replace("file://", "")
    assert art_dir.startswith(str(runs / "mlartifacts"))
    assert json.load(open(os.path.join(art_dir, "params_full.json")))["method.groups"] == long_val
    png = open(os.path.join(art_dir, "plots", "acc.png"), "rb").read()
    assert png[:4] == b"\x89PNG"
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    assert not (run_dir / BUFFER_FILE).exists()


def test_an_experiment_made_elsewhere_becomes_a_training_experiment(tmp_path):
    """An experiment created before the tag existed (or by the UI, as a GenAI one) is tagged as a
    model-training experiment as soon as a Tracker logs into it."""
    uri = default_tracking_uri(str(tmp_path / "runs"))
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("made-elsewhere")
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    t = Tracker(uri, "made-elsewhere", str(tmp_path / "runs" / "r"))
    assert t.start("r", {}, {}) and t.experiment_id == experiment_id
    t.end("FINISHED")
    assert client.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT_KIND


def test_resume_continues_same_run(tmp_path):
    uri = default_tracking_uri(str(tmp_path / "runs"))
    run_dir = str(tmp_path / "runs" / "r")
    t1 = Tracker(uri, "resume", run_dir)
    rid = t1.start("r", {"optim.lr": 0.1, "schedule.epochs": 6}, {"method": "baseline"})
    for e in range(3):
        t1.log_metrics(_epoch_metrics(e), e)
    t1.end("KILLED")
    c = MlflowClient(uri)
    assert c.get_run(rid).info.status == "KILLED"

    t2 = Tracker(uri, "resume", run_dir)
    # same params again, one changed (immutable in MLflow: must not fail), one new
    assert t2.start("r", {"optim.lr": 0.1, "schedule.epochs": 9, "train.ema": True},
                    {"method": "baseline"}, run_id=rid) == rid
    assert c.get_run(rid).info.status == "RUNNING"
    for e in range(3, 6):
        t2.log_metrics(_epoch_metrics(e), e)
    t2.end("FINISHED")
    run = c.get_run(rid)
    assert run.info.status == "FINISHED"
    assert run.data.params["schedule.epochs"] == "6" and run.data.params["train.ema"] == "True"
    assert json.loads(run.data.tags["resume.changed_params"]) == {"schedule.epochs": "9"}
    assert len(c.search_runs([run.info.experiment_id])) == 1
    _assert_every_step_once(c, rid, range(6))


def test_two_processes_create_new_sqlite_store_at_once(tmp_path):
    runs = tmp_path / "runs"
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import os, sys, time
        from pipeline.tracking.store import default_tracking_uri
        from pipeline.tracking.tracker import Tracker
        while not os.path.exists({str(go)!r}):
            time.sleep(0.005)
        uri = default_tracking_uri({str(runs)!r})
        t = Tracker(uri, "race", os.path.join({str(runs)!r}, "p" + sys.argv[1]))
        rid = t.start("p" + sys.argv[1], {{"i": sys.argv[1]}}, {{}})
        assert rid, "no run id"
        t.log_metrics({{"m": 1.0}}, 0)
        t.end("FINISHED")
        assert not t.offline, "calls were buffered"
        print("OK", rid)
    """)
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env=env, text=True) for i in range(3)]
    time.sleep(3.0)  # let all of them import mlflow and wait at the barrier
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "OK" in out, out
    c = MlflowClient(f"sqlite:///{runs}/mlflow.db")
    exp = c.get_experiment_by_name("race")
    runs_found = c.search_runs([exp.experiment_id])
    assert len(runs_found) == 3 and all(r.info.status == "FINISHED" for r in runs_found)


def test_unresponsive_server_fallback_then_sync(tmp_path, blackhole):
    run_dir = tmp_path / "run"
    t = Tracker(blackhole, "outage", str(run_dir), timeout=1, retry_interval=0.5)
    t0 = time.monotonic()
    assert t.start("never", {"optim.lr": 0.1}, {"method": "ssal"}) is None
    assert time.monotonic() - t0 < 2.5
    lat = []
    for e in range(6):
        time.sleep(0.2)
        t0 = time.monotonic()
        t.log_metrics(_epoch_metrics(e), e)
        lat.append(time.monotonic() - t0)
    t.set_tags({"late": "tag"})
    t.log_dict({"x": 1}, "confusion/summary.json")
    print(f"\nhung-server call latency: max {max(lat):.2f}s, all {[round(x, 2) for x in lat]}")
    assert max(lat) < 2.0
    # end() waits on the hung server at most one bounded probe, then writes the fallback store; creating a
    # fresh MLflow SQLite schema alone takes seconds on a loaded machine: measured here, side by side
    t0 = time.monotonic()
    ensure_sqlite_store(f"sqlite:///{tmp_path}/reference.db")
    schema_seconds = time.monotonic() - t0
    t0 = time.monotonic()
    t.end("FINISHED")
    assert time.monotonic() - t0 < schema_seconds + 5
    assert t.fallback_uri == f"sqlite:///{run_dir}/{FALLBACK_DB}" and "mlflow ui" in t.run_url

    fc = MlflowClient(t.fallback_uri)
    (run,) = fc.search_runs([fc.get_experiment_by_name("outage").experiment_id])
    assert run.data.tags["tracking.fallback"] == "true" and run.data.tags["late"] == "tag"
    assert run.data.tags["tracking.intended_uri"] == blackhole
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.1"
    _assert_every_step_once(fc, run.info.run_id, range(6))
    assert [a.path for a in fc.list_artifacts(run.info.run_id, "confusion")] == ["confusion/summary.json"]
    assert (run_dir / BUFFER_FILE).exists()  # kept for `sync`

    # merge later into a reachable store
    target = default_tracking_uri(str(tmp_path / "central"))
    assert tracking_main(["sync", str(run_dir), "--uri", target]) == 0
    c = MlflowClient(target)
    (srun,) = c.search_runs([c.get_experiment_by_name("outage").experiment_id])
    assert srun.info.status == "FINISHED" and srun.data.tags["late"] == "tag"
    assert srun.data.tags["tracking.synced_from_buffer"] == "true"
    _assert_every_step_once(c, srun.info.run_id, range(6))
    assert [a.path for a in c.list_artifacts(srun.info.run_id, "confusion")] == ["confusion/summary.json"]
    assert not (run_dir / BUFFER_FILE).exists()


def test_journal_left_by_dead_process_is_replayed(tmp_path, blackhole):
    run_dir = str(tmp_path / "run")
    t = Tracker(blackhole, "crash", run_dir, timeout=1, retry_interval=60)
    t.start("crashy", {"a": 1}, {})
    for e in range(3):
        t.log_metrics(_epoch_metrics(e), e)
    del t  # the process "died" without end(): only the journal remains
    uri = default_tracking_uri(str(tmp_path / "runs"))
    t2 = Tracker(uri, "crash", run_dir)
    rid = t2.start("crashy", {"a": 1}, {})
    for e in range(3, 5):
        t2.log_metrics(_epoch_metrics(e), e)
    t2.end("FINISHED")
    _assert_every_step_once(MlflowClient(uri), rid, range(5))
    assert not os.path.exists(os.path.join(run_dir, BUFFER_FILE))


@pytest.mark.slow
def test_real_server_killed_and_restarted(tmp_path, mlflow_server_factory):
    srv = mlflow_server_factory("server")
    run_dir = tmp_path / "run"
    t = Tracker(srv.url, "outage", str(run_dir), timeout=2, retry_interval=1.0)
    rid = t.start("kill-restart", {"optim.lr": 0.1, "model.arch": "resnet18"}, {"method": "ssal"})
    assert rid and t.run_url == f"{srv.url}/#/experiments/{t.experiment_id}/runs/{rid}?workflowType=machine_learning"
    assert MlflowClient(srv.url).get_experiment(t.experiment_id).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT_KIND
    for e in range(3):
        t.log_metrics(_epoch_metrics(e), e)
    t.log_dict({"before": True}, "before.json")
    assert not t.offline

    srv.stop()  # outage
    lat = []
    for e in range(3, 7):
        t0 = time.monotonic()
        t.log_metrics(_epoch_metrics(e), e)
        lat.append(time.monotonic() - t0)
        time.sleep(0.6)  # some calls fall inside the retry interval, some probe the dead server
    for call in (lambda: t.set_tags({"during": "outage"}),
                 lambda: t.log_dict({"during": True}, "during/outage.json")):
        t0 = time.monotonic()
        call()
        lat.append(time.monotonic() - t0)
    print(f"\nserver-down call latency: max {max(lat):.3f}s, all {[round(x, 3) for x in lat]}")
    assert max(lat) < 2.0
    assert t.offline
    journal = [json.loads(line) for line in open(run_dir / BUFFER_FILE)]
    assert [op["step"] for op in journal if op["op"] == "metrics"] == [3, 4, 5, 6]

    srv.start()  # same port, same backend store
    time.sleep(1.1)  # past the retry interval
    for e in range(7, 10):
        t.log_metrics(_epoch_metrics(e), e)
    assert not t.offline
    t.end("FINISHED")
    assert t.fallback_uri is None and not (run_dir / BUFFER_FILE).exists()
    assert not (run_dir / FALLBACK_DB).exists()

    c = MlflowClient(srv.url)
    run = c.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["during"] == "outage"
    # 4 metrics + tag + artifact while down, + the first call after restart (queued behind them)
    assert run.data.tags["tracking.buffered_calls"] == "7"
    _assert_every_step_once(c, rid, range(10))
    assert len(c.search_runs([t.experiment_id])) == 1
    arts = {a.path for a in c.list_artifacts(rid)}
    assert {"before.json", "during"} <= arts


@pytest.mark.slow
def test_http_resume_and_artifacts_on_shared_server(tmp_path, mlflow_server):
    run_dir = str(tmp_path / "run")
    t = Tracker(mlflow_server.url, "http-resume", run_dir)
    rid = t.start("h", {"optim.lr": 0.2}, {"method": "dks"})
    t.log_metrics(_epoch_metrics(0), 0)
    weights = tmp_path / "w.bin"
    weights.write_bytes(os.urandom(200_000))
    t.log_artifact(str(weights), "model")
    t.end("KILLED")
    t2 = Tracker(mlflow_server.url, "http-resume", run_dir)
    assert t2.start("h", {"optim.lr": 0.2}, {"method": "dks"}, run_id=rid) == rid
    t2.log_metrics(_epoch_metrics(1), 1)
    t2.end("FINISHED")
    c = MlflowClient(mlflow_server.url)
    assert c.get_run(rid).info.status == "FINISHED"
    _assert_every_step_once(c, rid, range(2))
    local = c.download_artifacts(rid, "model/w.bin", str(tmp_path / "dl"))
    assert open(local, "rb").read() == weights.read_bytes()
