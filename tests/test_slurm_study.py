"""A study submitted to the REAL SLURM test cluster (slurm/testcluster.sh, the session `slurm_cluster` fixture
in conftest.py) with the real command line, `pipeline/launch.py --study FILE --partition P --nodes 1`:

* one job per stage, printed with its id;
* while they are pending, `scontrol show job` shows each dependent stage's `afterok:<parent ids>` (the report
  stage: every other stage) and the sibling (`dks`) none; afterwards `sacct` shows each job started only
  after its parents ended, and every job COMPLETED;
* the study's MLflow store has one FINISHED run per stage with the tags study / stage / method, and the
  groups stage wrote its JSON (and logged it as an artifact);
* submitting it again while the chain is in flight, with one more stage, submits only that stage (waiting
  for the baseline job already in the queue) and a new report that replaces the waiting one: no stage runs
  twice;
* submitting the same study again at the end submits nothing: every stage is finished and skipped;
* sbatch refusing one stage (a partition that does not exist): one error line, exit 2, and the jobs
  submitted before it are cancelled.

Tiny on purpose (32 px, 2 epochs x 4 steps, 1 loader worker, 1 k-means restart): the wall time is SLURM's
scheduling and each job's Python start, five jobs in a row (baseline -> groups -> ssal -> lc -> report;
dks runs beside baseline on the other node).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, str(REPO / "pipeline" / "launch.py")]
STUDY_ID = "slurmci"
STUDY = f"""\
study: {STUDY_ID}
experiment: slurm-study
base:
  overrides:
    data.batch_size: 16
    data.val_batch_size: 64
    data.num_workers: 1
    schedule.epochs: 2
    schedule.peak_epoch: 1
    train.max_steps_per_epoch: 4
    tracking.log_model: false
stages:
  baseline:
    overrides: {{method.name: baseline}}
  groups:
    kind: groups
    from: baseline
    k: [4]
    restarts: 1
  ssal:
    overrides: {{method.name: ssal, method.groups_file: "${{groups}}"}}
  lc:
    kind: lc
    from: ssal
    epochs: 1
  dks:
    overrides: {{method.name: dks}}
"""
# the same study with one more stage, submitted while the first chain is in flight
MORE = STUDY + """\
  groups2:
    kind: groups
    from: baseline
    k: [2]
    restarts: 1
"""
# stage -> the stages its job waits for (afterok)
PARENTS = {"baseline": [], "groups": ["baseline"], "ssal": ["groups"], "lc": ["ssal"], "dks": [],
           "report": ["baseline", "groups", "ssal", "lc", "dks"]}
METHOD = {"baseline": "baseline", "groups": "groups", "ssal": "ssal", "lc": "ssal+lc", "dks": "dks",
          "groups2": "groups", "report": "report"}
WAIT_S = 600

pytestmark = pytest.mark.slow


def submit(cluster, study_file: Path, data_root: Path, runs_root: Path) -> subprocess.CompletedProcess:
    """The user's command line: the test cluster's profile, its partition, one node per training job."""
    return subprocess.run(LAUNCH + ["--study", str(study_file), "--cluster", "testcluster", "--partition", "gpu",
                                    "--nodes", "1", f"data.root={data_root}", f"runs_root={runs_root}"],
                          env=cluster.env, cwd=str(REPO), capture_output=True, text=True, timeout=300)


def submitted(text: str) -> dict[str, str]:
    """stage -> job id, from the launcher's '[study] submitted NAME (KIND) as job ID' lines."""
    return dict(re.findall(r"\[study\] submitted (\S+) \(\w+\) as job (\d+)", text))


def dependency(cluster, job: str) -> list[str]:
    """The job ids in `scontrol show job`'s Dependency= (afterok:ID(unfulfilled),afterok:ID2(...) or (null))."""
    info = cluster.cmd("scontrol", "show", "job", job)
    return sorted(re.findall(r"afterok:(\d+)", re.search(r"\bDependency=(\S+)", info).group(1)), key=int)


def queue(cluster) -> set[str]:
    """Every job id the controller knows (ended ones stay listed for MinJobAge = 1 h; array elements as A_I)."""
    return set(cluster.cmd("squeue", "-h", "--states=all", "-o", "%i").split())


def sacct_rows(cluster, ids) -> dict[str, dict[str, str]]:
    out = cluster.cmd("sacct", "-X", "-n", "-P", "-o", "JobID,JobName,State,Start,End,NodeList", "-j", ",".join(ids))
    rows = {}
    for line in out.splitlines():
        job, name, state, start, end, nodes = line.split("|")
        rows[job] = dict(name=name, state=state.split()[0], start=start, end=end, nodes=nodes)
    return rows


def stage_logs(study_dir: Path, stage: str, job: str) -> str:
    """The tail of a stage job's logs (for failure messages)."""
    text = []
    for path in sorted((study_dir / "slurm" / stage / job).glob("*_log.*")):
        text.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-2500:])
    return "\n".join(text) or f"(no logs under {study_dir / 'slurm' / stage / job})"


def test_study_runs_as_afterok_chain_on_slurm(slurm_cluster, tiny_demo, tmp_path):
    t0 = time.monotonic()
    study_file = tmp_path / "study.yaml"
    study_file.write_text(STUDY)
    runs_root = tmp_path / "runs"
    study_dir = runs_root / "studies" / STUDY_ID
    known = queue(slurm_cluster)  # the session's earlier jobs

    proc = submit(slurm_cluster, study_file, tiny_demo, runs_root)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    ids = submitted(out)
    assert list(ids) == ["baseline", "groups", "ssal", "lc", "dks", "report"], out[-4000:]
    assert len(set(ids.values())) == len(ids)

    # while the chain waits: real SLURM holds each stage's afterok dependencies (the baseline takes far longer
    # than these looks, so every dependent job is still pending on an unfulfilled dependency)
    for stage, job in ids.items():
        info = slurm_cluster.cmd("scontrol", "show", "job", job)
        assert dependency(slurm_cluster, job) == sorted((ids[p] for p in PARENTS[stage]), key=int), (stage, info)
        assert re.search(rf"\bJobName={STUDY_ID}-{stage}\b", info) and re.search(r"\bPartition=gpu\b", info), info
        assert re.search(r"\bNumNodes=1\b", info), (stage, info)
        if PARENTS[stage]:
            assert re.search(r"\bJobState=PENDING Reason=Dependency\b", info), (stage, info)
            assert "(unfulfilled)" in info, (stage, info)

    # the command again, in flight, with one more stage: the queued stages are not submitted twice; the new
    # stage waits for the baseline job already in the queue; a new report waits for everything and replaces
    # the old one, which was still waiting
    study_file.write_text(MORE)
    proc = submit(slurm_cluster, study_file, tiny_demo, runs_root)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for stage in ("baseline", "groups", "ssal", "lc", "dks"):
        assert f"[study] {stage}: job {ids[stage]} is still in the queue, not submitted again" in out, out[-4000:]
    more = submitted(out)
    assert list(more) == ["groups2", "report"], out[-4000:]
    assert f"[study] report: cancelled its earlier job {ids['report']}" in out, out[-4000:]
    assert dependency(slurm_cluster, more["groups2"]) == [ids["baseline"]]
    assert dependency(slurm_cluster, more["report"]) == sorted(
        [ids[s] for s in ("baseline", "groups", "ssal", "lc", "dks")] + [more["groups2"]], key=int)
    jobs = {**{f"{s}#1": j for s, j in ids.items()}, **{f"{s}#2": j for s, j in more.items()}}
    parents = {**{f"{s}#1": [f"{p}#1" for p in ps] for s, ps in PARENTS.items() if s != "report"},
               "groups2#2": ["baseline#1"], "report#2": [f"{p}#1" for p in PARENTS["report"]] + ["groups2#2"]}
    names = {job: key for key, job in jobs.items()}
    assert queue(slurm_cluster) - known == set(jobs.values())  # nothing else was submitted

    # every job ends (a failed stage would cancel its dependents: kill-on-invalid-dep)
    deadline = time.monotonic() + WAIT_S
    while slurm_cluster.cmd("squeue", "-h", "-j", ",".join(jobs.values()), check=False).strip():
        assert time.monotonic() < deadline, slurm_cluster.cmd("squeue", "-j", ",".join(jobs.values()))
        time.sleep(2)
    chain_s = time.monotonic() - t0
    while True:  # slurmdbd may lag behind the controller by a moment
        rows = sacct_rows(slurm_cluster, jobs.values())
        if all(r["state"] not in ("PENDING", "RUNNING", "COMPLETING") for r in rows.values()) \
                or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert set(rows) == set(jobs.values()), rows
    assert rows[ids["report"]]["state"] == "CANCELLED", rows
    failed = {names[j]: r["state"] for j, r in rows.items() if r["state"] != "COMPLETED" and j != ids["report"]}
    assert not failed, f"{failed}\n" + "\n".join(stage_logs(study_dir, k.split("#")[0], jobs[k]) for k in failed)
    # ... each one started only after every job it depends on had ended; siblings overlapped
    when = {names[j]: (datetime.fromisoformat(r["start"]), datetime.fromisoformat(r["end"])) for j, r in rows.items()
            if j != ids["report"]}
    for key, deps in parents.items():
        for parent in deps:
            assert when[key][0] >= when[parent][1], (key, when[key], parent, when[parent])
    assert when["dks#1"][0] < when["baseline#1"][1], when  # no dependency between siblings: side by side

    # MLflow: one FINISHED run per stage, tagged for the comparison; the groupings on disk and in MLflow
    import mlflow

    from pipeline.tracking import runs
    from pipeline.tracking.store import default_tracking_uri

    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri(str(runs_root)))
    tagged = runs.study_runs(client, STUDY_ID)
    by_stage = {}
    for run in tagged:
        by_stage.setdefault(run.data.tags.get("stage"), []).append(run)
    assert {s: len(r) for s, r in by_stage.items()} == {s: 1 for s in METHOD}, \
        {s: [(r.info.run_id, r.info.status) for r in rs] for s, rs in by_stage.items()}
    for stage, stage_runs in by_stage.items():
        for run in stage_runs:
            assert run.info.status == "FINISHED", (stage, run.info.status)
            assert run.data.tags["study"] == STUDY_ID and run.data.tags["method"] == METHOD[stage], run.data.tags
    for stage in ("groups", "groups2"):
        assert (study_dir / stage / "groups.json").is_file()
        assert "groups.json" in {a.path for a in client.list_artifacts(by_stage[stage][0].info.run_id)}
    ssal = by_stage["ssal"][0]
    assert ssal.data.tags["groups"] == "4" and "val/top1/joint" in ssal.data.metrics
    assert by_stage["lc"][0].data.tags["source_run"] == ssal.info.run_id
    assert (study_dir / "report" / "report.md").is_file()

    # the same command at the end: every stage is finished, nothing is submitted
    before = queue(slurm_cluster)
    proc = submit(slurm_cluster, study_file, tiny_demo, runs_root)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for stage in METHOD:
        assert f"[study] {stage}: finished earlier, skipped" in out, out
    assert "[study] every stage is finished; nothing submitted" in out and not submitted(out), out
    assert queue(slurm_cluster) == before
    assert len(runs.study_runs(client, STUDY_ID)) == len(tagged)
    print(f"study chain on SLURM: {chain_s:.0f} s to the last job's end, {time.monotonic() - t0:.0f} s in all")


def test_refused_stage_cancels_what_was_submitted_before_it(slurm_cluster, tiny_demo, tmp_path):
    """sbatch refuses the third stage's job (no such partition): one error line, exit 2, and the two jobs
    already submitted are cancelled instead of left waiting for a chain that will never be complete."""
    study_file = tmp_path / "study.yaml"
    study_file.write_text(STUDY.replace("  ssal:\n", "  ssal:\n    slurm: {partition: nope}\n"))
    proc = submit(slurm_cluster, study_file, tiny_demo, tmp_path / "runs")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = submitted(proc.stdout)
    assert list(ids) == ["baseline", "groups"], proc.stdout[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error", "sbatch", "Traceback"))]
    assert len(errors) == 1 and errors[0].startswith("error: submitting stage ssal failed"), proc.stderr
    assert "invalid partition" in errors[0].lower() and f"cancelled the job(s) submitted before it " \
        f"({ids['baseline']}, {ids['groups']})" in errors[0], errors[0]
    deadline = time.monotonic() + 60
    while True:
        states = {r["state"] for r in sacct_rows(slurm_cluster, ids.values()).values()}
        if states == {"CANCELLED"} or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert states == {"CANCELLED"}, states
