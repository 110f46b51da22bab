"""The SLURM launch path on a REAL SLURM cluster (slurm/testcluster.sh, started once per session by the
`slurm_cluster` fixture in conftest.py): 2 nodes, each slurmd in its own network namespace.

Scenarios (issue 4):
* bad config -> refused before submission, nothing in squeue;
* a task that crashes at the same step every time: the job restarts once, then ends (no hang), the error
  reaches the user; a config error in the job: no restart at all (issue 24);
* a task SIGKILLed / SIGSTOPped mid-epoch in a 2-node x 2-task job: the job restarts by itself (the watchdog
  names the stopped one) and ends with the undisturbed job's weights, every metric once (issue 24);
* `pipeline/launch.py --cluster testcluster --nodes 2` on the demo config: a 2-node x 1-task gloo DDP job
  finishes, MLflow shows world_size 2 and every head's metrics;
* preemption: SIGUSR2 mid-training -> checkpoint -> requeue -> finishes in the same MLflow run; every epoch's
  metrics exactly once; final weights equal to the uninterrupted run's (the 2-node job above, run at the
  same time with the same config);
* scancel (no requeue): a resumable mid-epoch checkpoint, the MLflow run KILLED;
* a job array over seeds with a concurrency limit.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, str(REPO / "pipeline" / "launch.py")]
# tiny, deterministic demo job: 3 epochs x 8 steps of 8 images per rank, evaluation every epoch
TINY = ["schedule.epochs=3", "train.max_steps_per_epoch=8", "data.batch_size=8", "data.val_batch_size=64",
        "data.num_workers=1", "tracking.log_model=false", "checkpoint.every_n_epochs=1", "train.seed=0"]
JOB_WAIT_S = 600

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- worker used by a test


def crash_rank1_at_step_10(argv: list[str]) -> int:
    """Worker entry for the same-step test: the real engine, but rank 1 raises as it finishes global step 10
    (epoch 2 of 8-step epochs: epoch 1 is checkpointed), in every start of the job."""
    from pipeline.train import entry as train
    from pipeline.train.watchdog import Watchdog

    if os.environ.get("SLURM_PROCID") == "1":
        step_done = Watchdog.step_done

        def failing(self, global_step: int) -> None:
            step_done(self, global_step)
            if global_step == 10:
                raise RuntimeError("simulated failure on rank 1 at global step 10 (test_slurm)")

        Watchdog.step_done = failing
    return train.main(argv)


def array_probe(argv: list[str]) -> int:
    """Worker entry for the array test: records what this element was given, and when it ran."""
    import json

    import yaml

    cfg = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
    out = Path(cfg["output_dir"])
    start = time.time()
    time.sleep(4)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps({
        "seed": cfg["train"]["seed"], "run_name": cfg["tracking"]["run_name"], "argv": argv,
        "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"), "start": start, "end": time.time()}))
    return 0


def env_probe(argv: list[str]) -> dict:
    """Worker entry for the GPU-layout test: what torch.distributed and CUDA would see in this task."""
    import json
    import socket

    import yaml

    out = Path(yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())["output_dir"])
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE")
    info = {k: os.environ.get(k) for k in keys}
    info["host"] = socket.gethostname()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"env-{info['RANK']}.json").write_text(json.dumps(info))
    return 0


# ----------------------------------------------------------------------------- helpers


def tiny(data_root: Path, runs_root: Path) -> list[str]:
    """The demo recipe on the session's tiny demo set (conftest `tiny_demo`: 16 classes, 12+4 images each)."""
    return ["--config", str(REPO / "configs" / "demo.yaml"), f"data.root={data_root}", "method.num_groups=[4]",
            f"runs_root={runs_root}", *TINY]


def job_id_from(text: str) -> str:
    m = re.search(r"submitted job (\d+)", text)
    assert m, f"no job id in launcher output:\n{text}"
    return m.group(1)


def job_state(cluster, job_id: str) -> str:
    out = cluster.cmd("sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id, check=False).strip()
    return out.splitlines()[0].split()[0] if out else "UNKNOWN"


def scontrol_field(cluster, job_id: str, field: str) -> str:
    out = cluster.cmd("scontrol", "show", "job", job_id)
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


def mlflow_client(runs_root: Path):
    import mlflow

    from pipeline.tracking.store import default_tracking_uri

    return mlflow.MlflowClient(tracking_uri=default_tracking_uri(str(runs_root)))


def only_run(runs_root: Path, run_dir: Path):
    """The one MLflow run in this store, checked against the run id the engine keeps in the run dir."""
    client = mlflow_client(runs_root)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, f"expected exactly one MLflow run in {runs_root}, got {[r.info.run_id for r in runs]}"
    assert (run_dir / "mlflow_run_id").read_text().strip() == runs[0].info.run_id
    return client, runs[0]


def histories(client, run) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
            for k in run.data.metrics}


class Launch:
    """`python pipeline/launch.py ... --wait` in the background, output in a file."""

    def __init__(self, cluster, args: list[str], log: Path):
        self.log = log
        self._fh = open(log, "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(LAUNCH + args, env=cluster.env, cwd=str(REPO), stdout=self._fh,
                                     stderr=subprocess.STDOUT, text=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def job_id(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"submitted job (\d+)", self.text())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(f"launcher did not submit:\n{self.text()}")

    def wait(self, timeout: float = JOB_WAIT_S) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"launcher --wait still running after {timeout} s:\n{self.text()[-4000:]}")
        finally:
            self._fh.close()
        self.seconds = time.monotonic() - self.t0
        return rc


# ----------------------------------------------------------------------------- tests


def test_bad_config_refused_before_submission(slurm_cluster, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n  momentom: 0.9\n")  # typo in a key
    name = "must-not-be-submitted"
    proc = subprocess.run(LAUNCH + ["--cluster", "testcluster", "--nodes", "2", "--job-name", name,
                                    "--output-dir", str(tmp_path / "run"), "--config", str(bad)],
                          env=slurm_cluster.env, cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err_lines) == 1 and err_lines[0].startswith("error:"), proc.stderr
    assert "optim.momentom" in err_lines[0]
    assert "submitted" not in proc.stdout
    assert slurm_cluster.cmd("squeue", "-h", "--states=all", "-n", name).strip() == ""
    assert not (tmp_path / "run").exists()  # nothing written either

    # an impossible value, given on the command line: same
    proc = subprocess.run(LAUNCH + ["--cluster", "testcluster", "--job-name", name, "schedule.epochs=0"],
                          env=slurm_cluster.env, cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "schedule.epochs" in proc.stderr
    assert slurm_cluster.cmd("squeue", "-h", "--states=all", "-n", name).strip() == ""


@pytest.mark.parametrize("array", [[], ["--array", "train.seed=0,1"]], ids=["job", "array"])
def test_refused_submission_is_one_line_and_leaves_no_scheduled_run(slurm_cluster, tiny_demo, tmp_path, array):
    """sbatch refuses the job, or the job array (no such partition): one error line with sbatch's reason, exit 2,
    nothing in the queue, and the MLflow runs the launcher created (SCHEDULED) for it are deleted again."""
    from mlflow.entities import ViewType

    runs_root, name = tmp_path / "runs", f"refused-{tmp_path.name}"
    client = mlflow_client(runs_root)  # the store exists already: MLflow's lines on creating it are not at stake
    proc = subprocess.run(LAUNCH + ["--cluster", "testcluster", "--partition", "nope", "--job-name", name,
                                    "--output-dir", str(tmp_path / "run"), *array, *tiny(tiny_demo, runs_root)],
                          env=slurm_cluster.env, cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: submission failed: "), proc.stderr
    assert "invalid partition" in errors[0].lower(), errors[0]
    assert "submitted job" not in proc.stdout
    assert slurm_cluster.cmd("squeue", "-h", "--states=all", "-n", name).strip() == ""
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert experiments and client.search_runs(experiments) == []
    assert len(client.search_runs(experiments, run_view_type=ViewType.DELETED_ONLY)) == (2 if array else 1)
    assert not list(tmp_path.rglob("mlflow_run_id"))


def test_a_failure_at_the_same_step_restarts_once_then_ends_the_job(slurm_cluster, tiny_demo, tmp_path):
    run_dir = tmp_path / "crash"
    launch = Launch(slurm_cluster, ["--cluster", "testcluster", "--nodes", "2", "--output-dir", str(run_dir),
                                    "--entry", "tests.test_slurm:crash_rank1_at_step_10", "--wait",
                                    *tiny(tiny_demo, tmp_path / "runs"), "schedule.epochs=20"],
                    tmp_path / "launch.log")
    job = launch.job_id()
    rc = launch.wait(timeout=500)
    out = launch.text()
    assert rc != 0, out[-3000:]
    assert "simulated failure on rank 1 at global step 10" in out, out[-3000:]  # the error reaches the user
    restarts = [ln for ln in out.splitlines() if ln.startswith(f"[restart] job {job}: ")]
    assert len(restarts) == 2, out[-3000:]
    assert restarts[0].startswith(f"[restart] job {job}: restart 1/3: rank 1 exited with code 1 (the run had reached "
                                  f"global step 10);")
    assert restarts[1].startswith(f"[restart] job {job}: not restarting: failed again at global step 10 with no "
                                  f"progress since the previous failure")
    assert job_state(slurm_cluster, job) == "FAILED"
    assert scontrol_field(slurm_cluster, job, "Restarts") == "1"
    assert slurm_cluster.cmd("squeue", "-h", "-j", job, check=False).strip() == ""  # nothing left running
    # both starts ended at once (srun --kill-on-bad-exit), not after gloo's 30-minute timeout
    assert launch.seconds < 400, launch.seconds


def test_a_config_error_in_the_job_is_not_restarted(slurm_cluster, tiny_demo, tmp_path):
    run_dir = tmp_path / "bad"
    launch = Launch(slurm_cluster, ["--cluster", "testcluster", "--nodes", "2", "--output-dir", str(run_dir),
                                    "--sbatch", "hold=true", "--wait", *tiny(tiny_demo, tmp_path / "runs")],
                    tmp_path / "launch.log")
    job = launch.job_id()
    submitted = run_dir / "slurm" / "submitted_config.yaml"  # what every (re)start reads: broken before it starts
    submitted.write_text(submitted.read_text() + "\nno_such_section: {epochs: 1}\n")
    slurm_cluster.cmd("scontrol", "release", job)
    rc = launch.wait(timeout=300)
    out = launch.text()
    assert rc != 0 and "no_such_section" in out, out[-3000:]
    restarts = [ln for ln in out.splitlines() if ln.startswith(f"[restart] job {job}: ")]
    assert len(restarts) == 1 and restarts[0].startswith(f"[restart] job {job}: not restarting: rank 0 exited with "
                                                         f"code 2 (a config, file or disk problem"), out[-3000:]
    assert job_state(slurm_cluster, job) == "FAILED"
    assert scontrol_field(slurm_cluster, job, "Restarts") == "0"


@pytest.fixture(scope="module")
def engine_jobs(slurm_cluster, tiny_demo, tmp_path_factory):
    """Two identical 2-node jobs at the same time: A runs undisturbed, B gets SIGUSR2 mid-training."""
    root = tmp_path_factory.mktemp("engine_jobs")
    jobs = {}
    for name in ("A", "B"):
        run_dir, runs_root = root / f"{name}-run", root / f"{name}-runs"
        launch = Launch(slurm_cluster, ["--cluster", "testcluster", "--partition", "gpu", "--nodes", "2",
                                        "--output-dir", str(run_dir), "--wait", *tiny(tiny_demo, runs_root)],
                        root / f"{name}.log")
        jobs[name] = dict(launch=launch, run_dir=run_dir, runs_root=runs_root)
    for j in jobs.values():
        j["id"] = j["launch"].job_id()

    # preempt B once its first epoch is checkpointed, i.e. in the middle of training
    b = jobs["B"]
    deadline = time.monotonic() + JOB_WAIT_S
    while not (b["run_dir"] / "last.pt").is_file():
        assert b["launch"].proc.poll() is None, f"B ended before its first checkpoint:\n{b['launch'].text()[-3000:]}"
        assert time.monotonic() < deadline, "B never wrote its first checkpoint"
        time.sleep(0.2)
    slurm_cluster.cmd("scancel", "--signal=USR2", b["id"])
    b["signalled_at"] = time.monotonic()

    for j in jobs.values():
        j["rc"] = j["launch"].wait()
        j["out"] = j["launch"].text()
        j["state"] = job_state(slurm_cluster, j["id"])
    return jobs


def test_two_node_ddp_job(slurm_cluster, engine_jobs):
    a = engine_jobs["A"]
    assert a["rc"] == 0, a["out"][-4000:]
    assert a["state"] == "COMPLETED"
    assert "world_size=2" in a["out"]
    assert re.search(r"CUDA_VISIBLE_DEVICES=[01]\b", a["out"])  # its one fake GPU (B may hold the other)
    assert scontrol_field(slurm_cluster, a["id"], "NodeList") == "n[1-2]"
    assert scontrol_field(slurm_cluster, a["id"], "Restarts") == "0"

    # every task returned its summary: 2 ranks on the 2 nodes
    from submitit.core.utils import pickle_load

    results = [pickle_load(a["run_dir"] / "slurm" / a["id"] / f"{a['id']}_{r}_result.pkl") for r in range(2)]
    assert [o for o, _ in results] == ["success", "success"]
    assert sorted((r["rank"], r["host"], r["world_size"]) for _, r in results) == [(0, "n1", 2), (1, "n2", 2)]

    client, run = only_run(a["runs_root"], a["run_dir"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2"
    assert run.data.params["schedule.epochs"] == "3"
    hist = histories(client, run)
    epochs = [1, 2, 3]
    # every head of SSAL (main, joint = main x branch, the branch's group accuracy), every epoch
    for key in ("val/top1/main", "val/top5/main", "val/top1/joint", "val/top5/joint", "val/group_top1/ssal.0",
                "val/loss", "train/loss", "train/ce/main", "train/ce/ssal.0"):
        assert key in hist, f"{key} missing; have {sorted(hist)}"
        assert [s for s, _ in hist[key]] == epochs, (key, hist[key])
    # metrics reduced over both ranks: every val image counted once
    assert all(v == hist["val/samples"][0][1] for _, v in hist["val/samples"])


def test_preemption_requeue_resumes_exactly(slurm_cluster, engine_jobs):
    a, b = engine_jobs["A"], engine_jobs["B"]
    assert b["rc"] == 0, b["out"][-5000:]
    assert b["state"] == "COMPLETED"
    # it really was preempted mid-training and requeued once (same job id)
    assert scontrol_field(slurm_cluster, b["id"], "Restarts") == "1", b["out"][-3000:]
    assert "got SIGUSR2" in b["out"] and f"requeueing job {b['id']}" in b["out"]
    assert "restart=1" in b["out"]
    m = re.search(r"resumed from \S+: epoch (\d+) step (\d+)", b["out"])
    assert m, b["out"][-3000:]

    # the same MLflow run continued (one run in B's store, the id kept in the run dir), and it finished
    client_b, run_b = only_run(b["runs_root"], b["run_dir"])
    assert run_b.info.status == "FINISHED"
    assert run_b.data.tags["world_size"] == "2"
    client_a, run_a = only_run(a["runs_root"], a["run_dir"])
    hist_a, hist_b = histories(client_a, run_a), histories(client_b, run_b)
    # every epoch's metrics exactly once, the same steps as the uninterrupted run
    assert set(hist_b) == set(hist_a)
    for key in hist_a:
        steps_b = [s for s, _ in hist_b[key]]
        assert len(steps_b) == len(set(steps_b)), (key, hist_b[key])
        assert steps_b == [s for s, _ in hist_a[key]], (key, hist_a[key], hist_b[key])
    # final weights: bit-identical to the uninterrupted run's
    import torch

    wa = torch.load(a["run_dir"] / "final_weights.pt", map_location="cpu", weights_only=False)
    wb = torch.load(b["run_dir"] / "final_weights.pt", map_location="cpu", weights_only=False)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    lr_a, lr_b = hist_a["train/lr"], hist_b["train/lr"]
    assert not different, (f"{len(different)} of {len(wa)} tensors differ from the uninterrupted run, e.g. "
                           f"{different[:3]}; train/lr per epoch A={lr_a} B={lr_b}")

    differ = []  # evaluation: the same values as the uninterrupted run
    for key in hist_a:
        if key.startswith("val/") or key == "train/lr":
            differ += [(key, sa, va, vb) for (sa, va), (sb, vb) in zip(hist_a[key], hist_b[key])
                       if vb != pytest.approx(va, rel=1e-5, abs=1e-7)]
    assert not differ, "metrics differ from the uninterrupted run (key, epoch, A, B):\n" + \
        "\n".join(map(str, differ))


def test_preempted_epoch_train_metrics_match(engine_jobs):
    """The training means of the interrupted epoch combine what every rank saw before and after the requeue."""
    a, b = engine_jobs["A"], engine_jobs["B"]
    assert b["rc"] == 0, b["out"][-3000:]
    client_a, run_a = only_run(a["runs_root"], a["run_dir"])
    client_b, run_b = only_run(b["runs_root"], b["run_dir"])
    hist_a, hist_b = histories(client_a, run_a), histories(client_b, run_b)
    differ = [(key, sa, va, vb) for key in hist_a if key == "train/loss" or key.startswith("train/ce/")
              for (sa, va), (sb, vb) in zip(hist_a[key], hist_b.get(key, []))
              if vb != pytest.approx(va, rel=1e-5, abs=1e-7)]
    assert not differ, ("per-epoch training metrics differ from the uninterrupted run (key, epoch, A, B) - e.g. "
                        "only rank 0's partial epoch meter is checkpointed:\n" + "\n".join(map(str, differ)))

# 2 nodes x 2 tasks (CPU tasks, 1 declared CPU each, so that two of these jobs run at once)
FAULT_JOB = ["--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpus-per-task", "1", "--mem", "1500M"]
HANG_TIMEOUT_S = 30  # explicit: 8 ranks share the box's 2 cores, a step takes seconds
FAULTS = {"K": signal.SIGKILL, "H": signal.SIGSTOP}


def task_logs(run_dir: Path, job: str) -> str:
    return "".join(path.read_text(errors="replace") for path in sorted((run_dir / "slurm" / job).glob("*_log.err")))


@pytest.fixture(scope="module")
def fault_jobs(slurm_cluster, tiny_demo, tmp_path_factory):
    """Identical 2-node x 2-task jobs: R undisturbed; K: rank 3 (on n2) SIGKILLed in epoch 2, at the same time
    as R; then H: rank 3 SIGSTOPped in epoch 2 (epoch 1 is checkpointed in both). Each fault's time to the
    first step of the restarted job is measured (and, for the hang, to the watchdog's line)."""
    root = tmp_path_factory.mktemp("fault_jobs")
    jobs = {}

    def launch(name: str) -> None:
        run_dir, runs_root = root / f"{name}-run", root / f"{name}-runs"
        job = Launch(slurm_cluster, ["--cluster", "testcluster", *FAULT_JOB, "--output-dir", str(run_dir), "--wait",
                                     *tiny(tiny_demo, runs_root), "train.log_every=1",
                                     f"train.hang_timeout_s={HANG_TIMEOUT_S}"], root / f"{name}.log")
        jobs[name] = dict(launch=job, run_dir=run_dir, runs_root=runs_root, id=job.job_id())

    def fault_and_restart(name: str) -> None:
        j, first_step_of_epoch_2 = jobs[name], "epoch 2/3 step 1/"  # 6 steps an epoch: 192 images / 4 ranks / 8
        deadline = time.monotonic() + JOB_WAIT_S
        while "first_step_after_s" not in j:
            text = j["launch"].text()
            assert j["launch"].proc.poll() is None, f"{name} ended early:\n{text[-3000:]}"
            if "fault_at" not in j and first_step_of_epoch_2 in text:
                j["victim"] = json.loads((j["run_dir"] / ".heartbeat" / "rank3.json").read_text())
                os.kill(j["victim"]["pid"], FAULTS[name])
                j["fault_at"] = time.monotonic()
            if "fault_at" in j and "hang_seen_s" not in j and "error: hang: " in task_logs(j["run_dir"], j["id"]):
                j["hang_seen_s"] = time.monotonic() - j["fault_at"]
            if "fault_at" in j and text.count(first_step_of_epoch_2) == 2:
                j["first_step_after_s"] = time.monotonic() - j["fault_at"]
            assert time.monotonic() < deadline, f"{name}: no fault or no step after it in {JOB_WAIT_S} s"
            time.sleep(0.2)

    def finish(name: str) -> None:
        j = jobs[name]
        j["rc"] = j["launch"].wait()
        j["out"], j["logs"] = j["launch"].text(), task_logs(j["run_dir"], j["id"])
        j["state"] = job_state(slurm_cluster, j["id"])

    launch("R")
    launch("K")
    fault_and_restart("K")
    finish("R")
    finish("K")
    launch("H")
    fault_and_restart("H")
    finish("H")
    print("fault to the first step after the restart (SLURM test cluster): " + ", ".join(
        f"{FAULTS[n].name} {jobs[n]['first_step_after_s']:.1f} s" for n in FAULTS)
        + f"; hang seen {jobs['H'].get('hang_seen_s', float('nan')):.1f} s after the SIGSTOP")
    return jobs


def assert_restarted_once_to_the_same_end(cluster, jobs: dict, name: str, reason: str) -> None:
    j, r = jobs[name], jobs["R"]
    assert r["rc"] == 0 and r["state"] == "COMPLETED", r["out"][-3000:]
    assert j["rc"] == 0 and j["state"] == "COMPLETED", j["out"][-4000:]
    assert scontrol_field(cluster, j["id"], "Restarts") == "1"
    restarts = [ln for ln in j["out"].splitlines() if ln.startswith(f"[restart] job {j['id']}: ")]
    assert len(restarts) == 1 and restarts[0].startswith(f"[restart] job {j['id']}: restart 1/3: {reason}"), \
        j["out"][-3000:]
    import torch

    wr = torch.load(r["run_dir"] / "final_weights.pt", map_location="cpu", weights_only=True)
    wj = torch.load(j["run_dir"] / "final_weights.pt", map_location="cpu", weights_only=True)
    assert wr.keys() == wj.keys() and all(torch.equal(wr[k], wj[k]) for k in wr)  # deterministic mode: bit-exact
    client, run = only_run(j["runs_root"], j["run_dir"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["restarts"] == "1" and run.data.tags["restart.1.reason"].startswith(reason)
    hist = histories(client, run)
    for key, values in hist.items():  # every metric once per step
        assert len({s for s, _ in values}) == len(values), (key, values)
    assert [s for s, _ in hist["run/restarts"]] == [1]
    assert [s for s, _ in hist["val/top1/main"]] == [s for s, _ in hist["train/loss"]] == [1, 2, 3]


def test_a_killed_task_restarts_the_job_which_ends_as_an_undisturbed_one(slurm_cluster, fault_jobs):
    assert_restarted_once_to_the_same_end(slurm_cluster, fault_jobs, "K", "rank 3 gone without an exit code")
    assert fault_jobs["K"]["first_step_after_s"] < 240


def test_a_stopped_task_is_named_by_the_watchdog_and_the_job_restarts(slurm_cluster, fault_jobs):
    h = fault_jobs["H"]
    victim = h["victim"]
    lines = [ln for ln in h["logs"].splitlines() if ln.startswith("error: hang: ")]
    assert len(lines) == 1, h["logs"][-3000:]
    assert lines[0].startswith(f"error: hang: rank 3 on n2 (pid {victim['pid']}) made no progress for ")
    assert h["hang_seen_s"] < HANG_TIMEOUT_S + 15, h["hang_seen_s"]
    assert_restarted_once_to_the_same_end(slurm_cluster, fault_jobs, "H", "hang: rank 3 on n2 made no progress")


def test_scancel_keeps_checkpoint_and_marks_run_killed(slurm_cluster, tiny_demo, tmp_path):
    run_dir, runs_root = tmp_path / "run", tmp_path / "runs"
    launch = Launch(slurm_cluster, ["--cluster", "testcluster", "--nodes", "2", "--output-dir", str(run_dir),
                                    "--wait", *tiny(tiny_demo, runs_root), "schedule.epochs=20", "train.log_every=1",
                                    # 48 steps an epoch (192 images / 2 ranks / 2): the cancel lands long before
                                    # the epoch ends (with 8 it sometimes came after, in epoch 2)
                                    "data.batch_size=2", "train.max_steps_per_epoch=48",
                                    # the stop is seen at the next flag agreement: every step here, where a step
                                    # takes seconds and SLURM's KillWait is 10 s (on a GPU 8 steps are 1-2 s)
                                    "train.sync_every=1"],
                    tmp_path / "launch.log")
    job = launch.job_id()
    deadline = time.monotonic() + JOB_WAIT_S
    while "epoch 1/20 step 2/" not in launch.text():  # in the middle of the first epoch
        assert launch.proc.poll() is None, launch.text()[-3000:]
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    assert not (run_dir / "last.pt").exists()
    slurm_cluster.cmd("scancel", job)  # SIGTERM, no requeue
    rc = launch.wait(timeout=300)
    out = launch.text()
    assert rc != 0 and "cancelled" in out, out[-3000:]
    assert job_state(slurm_cluster, job).startswith("CANCELLED")
    assert scontrol_field(slurm_cluster, job, "Restarts") == "0"  # not requeued
    assert "stopped (stop requested" in out, out[-3000:]  # the engine saw SIGTERM in time and checkpointed
    import torch

    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)  # resumable, mid-epoch
    assert state["epoch"] == 0 and state["step_in_epoch"] >= 2
    _, run = only_run(runs_root, run_dir)
    assert run.info.status == "KILLED"


def test_job_array_with_concurrency_limit(slurm_cluster, tmp_path):
    import json

    root = tmp_path / "study"
    launch = Launch(slurm_cluster, ["--cluster", "testcluster", "--nodes", "1", "--output-dir", str(root),
                                    "--entry", "tests.test_slurm:array_probe", "--array", "train.seed=3,4,5",
                                    "--array-parallelism", "2", "--wait"], tmp_path / "launch.log")
    rc = launch.wait(timeout=300)
    assert rc == 0, launch.text()[-3000:]
    probes = [json.loads((root / f"{i:03d}-seed={seed}" / "probe.json").read_text())
              for i, seed in enumerate((3, 4, 5))]
    assert [p["seed"] for p in probes] == [3, 4, 5]
    assert [p["array_task"] for p in probes] == ["0", "1", "2"]
    assert len({p["run_name"] for p in probes}) == 3  # one MLflow run name per element
    assert all(p["argv"][-2:] == ["--resume", "auto"] for p in probes)
    # never more than 2 elements at once
    events = sorted([(p["start"], 1) for p in probes] + [(p["end"], -1) for p in probes])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= 2


def test_one_task_per_gpu_environment(slurm_cluster, tmp_path):
    """2 nodes x 2 (fake) GPUs: 4 tasks, ranks 0-3, local ranks 0-1 per node, every task sees its node's GPUs
    (the engine picks cuda:LOCAL_RANK), MASTER_ADDR is the first node."""
    import json

    run_dir = tmp_path / "gpus"
    launch = Launch(slurm_cluster, ["--cluster", "testcluster", "--nodes", "2", "--gpus-per-node", "2",
                                    "--output-dir", str(run_dir), "--entry", "tests.test_slurm:env_probe", "--wait"],
                    tmp_path / "launch.log")
    assert launch.wait(timeout=300) == 0, launch.text()[-3000:]
    envs = sorted((json.loads(p.read_text()) for p in run_dir.glob("env-*.json")), key=lambda e: int(e["RANK"]))
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert {e["WORLD_SIZE"] for e in envs} == {"4"} and {e["LOCAL_WORLD_SIZE"] for e in envs} == {"2"}
    assert [(e["host"], e["LOCAL_RANK"]) for e in envs] == [("n1", "0"), ("n1", "1"), ("n2", "0"), ("n2", "1")]
    assert {e["MASTER_ADDR"] for e in envs} == {"n1"} and len({e["MASTER_PORT"] for e in envs}) == 1
    assert {e["CUDA_VISIBLE_DEVICES"] for e in envs} == {"0,1"}
