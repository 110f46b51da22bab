"""pipeline/launch.py (pipeline/launch/), the SLURM task (pipeline/launch/task.py) and pipeline/train/preemption.py
without a cluster (fast): the sbatch script a launch would submit (--dry-run), profiles vs flags, refusals before
submission, job arrays, the signal protocol and what a SLURM task does with each exit code. The real-cluster runs
are in test_slurm.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.launch import cli as launch
from pipeline.launch import slurm
from pipeline.launch import task as slurm_task
from pipeline.train import preemption

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, str(REPO / "pipeline" / "launch.py")]


def run_launch(*args, cwd=None, env=None):
    return subprocess.run(LAUNCH + list(args), cwd=str(cwd or REPO), capture_output=True, text=True, timeout=120,
                          env=env)


def sbatch_lines(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key] = value
    return out


# ----------------------------------------------------------------------------- CLI, profiles, dry-run


def test_help_runs_as_a_file_from_anywhere(tmp_path):
    proc = run_launch("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--local", "--nproc", "--partition", "--nodes", "--gpus-per-node", "--cpus-per-task", "--mem",
                 "--time", "--account", "--qos", "--constraint", "--job-name", "--output-dir", "--cluster", "--wait",
                 "--array", "scancel --signal=USR2", "testcluster", "example_gpu", "--study"):
        assert flag in proc.stdout, flag
    proc = subprocess.run([sys.executable, str(REPO / "pipeline" / "study.py"), "--help"], cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for text in ("--status", "--local", "--dry-run", "Study file (YAML)", "afterok"):  # the study file format too
        assert text in proc.stdout, text


def test_dry_run_testcluster_profile(tmp_path):
    proc = run_launch("--cluster", "testcluster", "--dry-run", "--output-dir", str(tmp_path / "run"),
                      "schedule.epochs=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    s = sbatch_lines(proc.stdout)
    assert s["nodes"] == "2" and s["ntasks-per-node"] == "1" and s["gpus-per-node"] == "1"
    assert s["partition"] == "gpu" and s["time"] == "00:30:00" and s["signal"] == "USR2@60"
    assert s["cpus-per-task"] == "3" and s["mem"] == "1500M"
    assert "--kill-on-bad-exit=1" in proc.stdout  # one failing task ends the job
    assert f"export PYTHONPATH={REPO}" in proc.stdout
    assert "--resume auto" in proc.stdout
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_flags_override_the_profile(tmp_path):
    proc = run_launch("--cluster", "example_gpu", "--nodes", "4", "--gpus-per-node", "4", "--cpus-per-task", "6",
                      "--mem", "200G", "--time", "1-00:00:00", "--account", "acc", "--qos", "high",
                      "--constraint", "h100", "--job-name", "jn", "--signal-delay", "300", "--sbatch",
                      "reservation=res1", "--dry-run", "--output-dir", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr
    s = sbatch_lines(proc.stdout)
    assert s["nodes"] == "4" and s["gpus-per-node"] == "4" and s["ntasks-per-node"] == "4"  # one task per GPU
    assert s["cpus-per-task"] == "6" and s["mem"] == "200G" and s["time"] == "1-00:00:00"
    assert s["account"] == "acc" and s["qos"] == "high" and s["constraint"] == "h100" and s["job-name"] == "jn"
    assert s["signal"] == "USR2@300" and s["reservation"] == "res1"
    assert "exclusive" in s  # from the profile's extra sbatch options
    assert "source .venv/bin/activate" in proc.stdout  # profile setup lines


@pytest.mark.parametrize("args, message", [
    (["--cluster", "nosuchcluster"], "no profile"),
    (["--nodes", "0"], "nodes"),
    (["--gpus-per-node", "8", "--tasks-per-node", "2"], "one task per GPU"),
    (["--time", "tomorrow"], "time"),
    (["--mem", "lots"], "mem"),
    (["--resume", "/some/ckpt.pt"], "--resume"),
    (["--sbatch", "novalue"], "--sbatch"),
])
def test_bad_launch_options_are_one_line_errors(args, message, tmp_path):
    proc = run_launch(*args, "--dry-run", "--output-dir", str(tmp_path / "r"))
    assert proc.returncode == launch.EXIT_USAGE, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr


@pytest.mark.parametrize("args, needles", [
    (["--gpus-per-node", "4"], ["cpus_per_task: not set for a GPU job", "--cpus-per-task 4 (data.num_workers=2"]),
    (["--gpus-per-node", "4", "--cpus-per-task", "2"],
     ["data.num_workers=2 >= cpus_per_task=2", "--cpus-per-task 4", "lower data.num_workers to 1"]),
    (["--cluster", "example_gpu", "--cpus-per-task", "10", "--config", str(REPO / "configs/imagenet/resnet50_baseline.yaml")],
     ["data.num_workers=10 >= cpus_per_task=10", "--cpus-per-task 12", "lower data.num_workers to 8"]),
    (["--cluster", "testcluster", "data.num_workers=3"], ["data.num_workers=3 >= cpus_per_task=3", "--cpus-per-task 5"]),
])
def test_a_gpu_job_without_cores_for_its_loader_is_refused_before_submission(args, needles, tmp_path):
    """The check runs before anything is rendered or submitted, --dry-run included: one line, exit 2."""
    proc = run_launch("--partition", "gpu", *args, "--dry-run", "--output-dir", str(tmp_path / "r"), cwd=tmp_path,
                      env=path_without_slurm(tmp_path))
    assert proc.returncode == launch.EXIT_USAGE, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(needle in lines[0] for needle in needles), lines[0]
    assert "#SBATCH" not in proc.stdout and not (tmp_path / "r").exists()


def test_a_cpu_job_needs_no_cpus_per_task_and_a_gpu_job_with_enough_passes(tmp_path):
    cpu = run_launch("--partition", "cpu", "--nodes", "2", "--dry-run", "--output-dir", str(tmp_path / "a"),
                     cwd=tmp_path, env=path_without_slurm(tmp_path))
    gpu = run_launch("--partition", "gpu", "--gpus-per-node", "2", "--cpus-per-task", "3", "--dry-run",
                     "--output-dir", str(tmp_path / "b"), cwd=tmp_path, env=path_without_slurm(tmp_path))
    assert cpu.returncode == 0 and gpu.returncode == 0, cpu.stderr + gpu.stderr
    assert sbatch_lines(gpu.stdout)["cpus-per-task"] == "3"


def test_profile_with_unknown_key_is_refused(tmp_path):
    bad = tmp_path / "mycluster.yaml"
    bad.write_text("partition: gpu\ngpu_per_node: 8\n")
    proc = run_launch("--cluster", str(bad), "--dry-run")
    assert proc.returncode == launch.EXIT_USAGE and "gpu_per_node" in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert f"--cluster {bad}: unknown key 'gpu_per_node' (did you mean gpus_per_node? valid keys here: " in line


@pytest.mark.parametrize("text, message", [
    ("sbatch: [exclusive]\n", "sbatch: expected a mapping, got ['exclusive']"),
    ("nodes: two\n", "nodes: expected an integer, got 'two'"),
    ("setup: {a: 1}\n", "setup: expected a list, got {'a': 1}"),
    ("time: [1]\n", "time: expected a string or an integer, got [1]"),
    ("- gpu\n", "expected a mapping with keys partition, nodes, "),
    ("nodes: [1\n", "bad.yaml line 2: not valid YAML"),
])
def test_bad_profiles_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(slurm.LaunchError) as err:
        slurm.load_profile(str(path))
    assert str(err.value).startswith(f"--cluster {path}") and message in str(err.value), err.value
    assert "\n" not in str(err.value)


def test_profile_nulls_keep_the_defaults_and_numbers_are_sbatch_syntax(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("time: null\naccount: null\nmem: 0\nsignal_delay_s: null\nsetup: module load cuda\n")
    args = launch.build_parser().parse_args(["--cluster", str(path), "--time", "90"])
    settings = slurm.slurm_settings(args)
    assert settings["account"] is None and settings["signal_delay_s"] == slurm.SlurmProfile().signal_delay_s
    assert settings["mem"] == "0" and settings["time"] == "90"  # strings, as sbatch reads them
    assert settings["setup"] == ["module load cuda"]  # one line alone is a list of one
    assert slurm.load_profile(str(path)).time == slurm.SlurmProfile().time
    assert set(settings) == set(slurm.PROFILE_KEYS)


def test_bad_config_is_refused_before_anything(tmp_path, monkeypatch, capsys):
    submitted = []
    monkeypatch.setattr(launch, "make_executor", lambda *args, **kwargs: submitted.append(args))
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: -1\n")
    rc = launch.main(["--partition", "gpu", "--nodes", "2", "--config", str(bad), "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == launch.EXIT_USAGE and len(err) == 1 and "optim.lr" in err[0]
    assert not submitted and not (tmp_path / "r").exists()
    rc = launch.main(["--partition", "gpu", "optim.momentom=0.9", "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == launch.EXIT_USAGE and "optim.momentom" in err and not submitted


def path_without_slurm(tmp_path, *commands: str) -> dict:
    """The environment of a machine whose PATH has no SLURM client but `commands`: executables that only leave
    a trace file when run (nothing may run them: the launcher must refuse before it submits)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in commands:
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\ntouch {tmp_path / (name + '.ran')}\nexit 1\n")
        script.chmod(0o755)
    return dict(os.environ, PATH=str(bin_dir))


@pytest.mark.parametrize("present", [(), ("sbatch",)], ids=["no-slurm", "sbatch-without-srun"])
def test_submission_without_slurm_is_one_line_exit_2(tmp_path, present):
    """A real submission needs sbatch (to submit) and srun (the job script runs it): one line, exit 2, not
    submitit's RuntimeError; the same for a study."""
    env = path_without_slurm(tmp_path, *present)
    for args in (["--partition", "gpu", "--output-dir", str(tmp_path / "r")],
                 ["--study", str(REPO / "studies" / "demo.yaml"), "--partition", "gpu"]):
        proc = run_launch(*args, cwd=tmp_path, env=env)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == launch.EXIT_USAGE and len(err) == 1, proc.stderr
        assert "srun" in err[0] and "not found" in err[0] and "--local" in err[0]
        assert ("sbatch and srun" in err[0]) == (not present)
        assert not list(tmp_path.glob("*.ran")) and not (tmp_path / "r").exists()


def test_dry_run_without_slurm_shows_the_script_and_says_so(tmp_path):
    """--dry-run is for a laptop too: the sbatch script and resolved settings without any SLURM installed."""
    proc = run_launch("--partition", "gpu", "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "4", "--dry-run",
                      "--output-dir", str(tmp_path / "run"), cwd=tmp_path, env=path_without_slurm(tmp_path))
    assert proc.returncode == 0, proc.stderr
    s = sbatch_lines(proc.stdout)
    assert s["nodes"] == "2" and s["ntasks-per-node"] == "4" and s["gpus-per-node"] == "4"
    assert "srun" in proc.stdout and "--kill-on-bad-exit=1" in proc.stdout
    assert "SLURM not found on this machine (sbatch and srun not on PATH)" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_existing_run_dir_needs_resume_auto(tmp_path, monkeypatch, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "last.pt").write_bytes(b"x")
    rc = launch.main(["--cluster", "testcluster", "--dry-run", "--output-dir", str(run)])
    assert rc == launch.EXIT_USAGE and "--resume auto" in capsys.readouterr().err
    rc = launch.main(["--cluster", "testcluster", "--dry-run", "--output-dir", str(run), "--resume", "auto"])
    assert rc == 0
    submitted_only = tmp_path / "s"  # submitted before, no checkpoint yet: its MLflow run id is there
    submitted_only.mkdir()
    (submitted_only / launch.RUN_ID_FILE).write_text("abc")
    rc = launch.main(["--cluster", "testcluster", "--dry-run", "--output-dir", str(submitted_only)])
    assert rc == launch.EXIT_USAGE and launch.RUN_ID_FILE in capsys.readouterr().err


def test_job_array_over_seeds_and_configs(tmp_path):
    proc = run_launch("--cluster", "testcluster", "--dry-run", "--output-dir", str(tmp_path / "study"),
                      "--array", "train.seed=0,1", "--array", "optim.lr=0.1,0.2", "--array-parallelism", "3")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --array=0-3%3" in proc.stdout
    runs = [ln for ln in proc.stdout.splitlines() if ln.startswith("# seed=")]
    assert len(runs) == 4 and str(tmp_path / "study" / "000-seed=0_lr=0.1") in runs[0]
    proc = run_launch("--cluster", "testcluster", "--dry-run", "--output-dir", str(tmp_path / "s2"),
                      "--array", f"config={REPO / 'configs' / 'demo.yaml'},{tmp_path / 'missing.yaml'}")
    assert proc.returncode == launch.EXIT_USAGE and "array element 1" in proc.stderr and "missing.yaml" in proc.stderr


def test_array_elements_are_validated_one_by_one(tmp_path):
    proc = run_launch("--cluster", "testcluster", "--dry-run", "--array", "schedule.epochs=2,0")
    assert proc.returncode == launch.EXIT_USAGE
    assert "array element 1" in proc.stderr and "schedule.epochs" in proc.stderr


def test_local_refuses_slurm_options():
    proc = run_launch("--local", "--nodes", "2")
    assert proc.returncode == launch.EXIT_USAGE and "--local" in proc.stderr


def test_local_runs_the_entry_in_process(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_ENTRY_RC", "0")
    monkeypatch.setenv("FAKE_ENTRY_OUT", str(tmp_path / "argv.txt"))
    rc = launch.main(["--local", "--entry", "tests.test_launch:fake_entry", "--output-dir", str(tmp_path / "r"),
                      "schedule.epochs=1"])
    assert rc == 0
    argv = (tmp_path / "argv.txt").read_text().split()
    assert argv == [f"output_dir={tmp_path / 'r'}", "schedule.epochs=1"]


@pytest.mark.parametrize("text, minutes", [("30", 30), ("00:30:00", 30), ("1:00:01", 61), ("2-00", 2880),
                                           ("1-01:30:00", 1530), ("10:30", 11)])
def test_time_to_minutes(text, minutes):
    assert slurm.time_to_minutes(text) == minutes


@pytest.mark.parametrize("state, over", [("PENDING", False), ("CONFIGURING", False), ("RUNNING", False),
                                         ("REQUEUED", False), ("COMPLETING", False), ("PREEMPTED", False),
                                         ("READY", False), ("UNKNOWN", False), ("", False), ("COMPLETED", True),
                                         ("FAILED", True), ("CANCELLED by 0", True), ("TIMEOUT", True)])
def test_when_a_followed_job_is_over(state, over):
    """--wait follows a job until SLURM lets it go: a job still holding its nodes (COMPLETING), preempted (it may
    come back) or not yet known to sacct is not over; what a study counts as still to run is never over."""
    assert slurm.is_over(state) == over
    assert not slurm.STILL_TO_RUN_STATES & {"COMPLETING", "COMPLETED", "FAILED", "CANCELLED", "READY", "UNKNOWN"}
    assert not any(slurm.is_over(still) for still in slurm.STILL_TO_RUN_STATES)


def test_task_failure_is_the_tasks_own_traceback(tmp_path):
    """What --wait prints for a failed task comes from submitit's public Job API (job.task(i), .paths,
    .exception()): the traceback the task raised, on real submitit jobs run on this machine; nothing for a task
    that returned."""
    import submitit

    executor = submitit.LocalExecutor(folder=str(tmp_path / "%j"))
    executor.update_parameters(timeout_min=2)
    failing, passing = executor.submit(int, "not a number"), executor.submit(int, "3")
    for job in (failing, passing):
        job.wait()
    trace = slurm.task_failure(failing.task(0))
    assert trace.startswith("Traceback") and trace.splitlines()[-1].startswith("ValueError: invalid literal"), trace
    assert slurm.task_failure(passing.task(0)) is None and passing.result() == 3
    assert "invalid literal" in slurm.log_path(failing, "err").read_text()


# ----------------------------------------------------------------------------- preemption protocol


@pytest.fixture
def clean_preemption():
    old = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    preemption.reset()
    yield
    preemption.reset()
    for s, h in old.items():
        signal.signal(s, h)


def test_usr2_is_preempt_and_requeue(clean_preemption):
    preemption.install_handlers()
    assert not preemption.requested()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert preemption.requested() and preemption.reason() == preemption.PREEMPT and preemption.requeue_pending()
    os.kill(os.getpid(), signal.SIGTERM)  # the requeue's own SIGTERM does not turn it into a kill
    assert preemption.reason() == preemption.PREEMPT and preemption.requeue_pending()


def test_term_is_killed_without_requeue(clean_preemption):
    preemption.install_handlers()
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.requested() and preemption.reason() == preemption.KILLED
    assert not preemption.requeue_pending()
    preemption.mark_requeue_pending()
    assert preemption.requeue_pending()


def test_second_term_ends_the_process():
    code = ("import os, signal, time\nfrom pipeline.train import preemption\npreemption.install_handlers()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\nassert preemption.requested()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(5)\nprint('survived')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM and "survived" not in proc.stdout


def test_handlers_replace_submitits(clean_preemption):
    # what submitit's process_job does before calling our task ...
    import submitit

    signal.signal(signal.SIGUSR2, lambda *args: pytest.fail("submitit's handler ran"))
    # ... and what our task does first
    preemption.install_handlers()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert preemption.requeue_pending()
    assert submitit  # imported: the versions agree on the hand-over


# ----------------------------------------------------------------------------- TrainTask exit codes


def fake_entry(argv: list[str]) -> int:
    """Entry for these tests: records argv, applies FAKE_ENTRY_SIGNAL, returns FAKE_ENTRY_RC."""
    out = os.environ.get("FAKE_ENTRY_OUT")
    if out:
        Path(out).write_text(" ".join(argv))
    kind = os.environ.get("FAKE_ENTRY_SIGNAL")
    if kind:
        preemption.request(kind)
    return int(os.environ.get("FAKE_ENTRY_RC", "0"))


@pytest.fixture
def task_env(monkeypatch, clean_preemption):
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # no TorchDistributedEnvironment outside SLURM
    requeued = []
    monkeypatch.setattr(slurm_task, "requeue_job", lambda job_id: requeued.append(job_id))
    monkeypatch.setattr(slurm_task.time, "sleep", lambda seconds: None)
    return requeued


def make_task(**kw):
    return slurm_task.TrainTask(argv=["--config", "x.yaml", "--resume", "auto"],
                                     entry="tests.test_launch:fake_entry", **kw)


def test_task_success_returns_summary(task_env, monkeypatch):
    monkeypatch.setenv("FAKE_ENTRY_RC", "0")
    out = make_task()()
    assert out["exit_code"] == 0 and out["rank"] == 0


def test_task_preempted_rank0_requeues_without_result(task_env, monkeypatch):
    monkeypatch.setenv("FAKE_ENTRY_RC", str(preemption.EXIT_PREEMPTED))
    monkeypatch.setenv("FAKE_ENTRY_SIGNAL", preemption.PREEMPT)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    task = make_task(export_torch_env=False)
    with pytest.raises(SystemExit):  # SystemExit, not an exception: submitit writes no result file
        task()
    assert task_env == ["42"]


def test_task_preempted_array_element_requeues_itself(task_env, monkeypatch):
    monkeypatch.setenv("FAKE_ENTRY_RC", str(preemption.EXIT_PREEMPTED))
    monkeypatch.setenv("FAKE_ENTRY_SIGNAL", preemption.PREEMPT)
    monkeypatch.setenv("SLURM_JOB_ID", "57")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "50")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    with pytest.raises(SystemExit):
        make_task(export_torch_env=False)()
    assert task_env == ["50_7"]


def test_task_preempted_other_rank_exits_zero(task_env, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("FAKE_ENTRY_RC", str(preemption.EXIT_PREEMPTED))
    monkeypatch.setenv("FAKE_ENTRY_SIGNAL", preemption.PREEMPT)
    with pytest.raises(SystemExit) as exc:
        make_task()()
    assert exc.value.code == 0 and task_env == []


def test_task_killed_does_not_requeue(task_env, monkeypatch):
    monkeypatch.setenv("FAKE_ENTRY_RC", str(preemption.EXIT_PREEMPTED))
    monkeypatch.setenv("FAKE_ENTRY_SIGNAL", preemption.KILLED)
    with pytest.raises(SystemExit) as exc:
        make_task()()
    assert exc.value.code == preemption.EXIT_PREEMPTED and task_env == []


def test_task_requeue_limit(task_env, monkeypatch):
    monkeypatch.setenv("FAKE_ENTRY_RC", str(preemption.EXIT_PREEMPTED))
    monkeypatch.setenv("FAKE_ENTRY_SIGNAL", preemption.PREEMPT)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    with pytest.raises(RuntimeError, match="max_requeues=3"):
        make_task(max_requeues=3)()
    assert task_env == []


def test_task_failure_raises(task_env, monkeypatch):
    monkeypatch.setenv("FAKE_ENTRY_RC", "1")
    with pytest.raises(RuntimeError, match="exited with code 1 on rank 0"):
        make_task()()


def test_mlflow_run_is_created_at_submission(tmp_path):
    """The launcher's MLflow run (SCHEDULED, id in the run dir) is the one the engine will resume."""
    import mlflow

    from pipeline.train.config import load_config, tracking_uri

    cfg = load_config(None, [f"runs_root={tmp_path / 'runs'}", "tracking.experiment=launch-test"])
    uri = tracking_uri(cfg)
    run_id, link = launch.create_mlflow_run(cfg, tmp_path / "run", uri)
    assert run_id and run_id in link and "mlflow ui --backend-store-uri" in link
    assert (tmp_path / "run" / launch.RUN_ID_FILE).read_text() == run_id
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "SCHEDULED" and run.info.run_name == cfg.run_name
    # again with the id already there (--resume auto): the same run
    assert launch.create_mlflow_run(cfg, tmp_path / "run", uri)[0] == run_id


def test_unreachable_tracking_server_does_not_block_submission(tmp_path):
    from pipeline.train.config import load_config

    cfg = load_config(None, ["tracking.uri=http://127.0.0.1:9", f"runs_root={tmp_path}"])
    run_id, link = launch.create_mlflow_run(cfg, tmp_path / "run", cfg.tracking.uri)
    assert run_id is None and "created when the job starts" in link
