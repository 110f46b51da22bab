"""Running a study: its plan and state (``python pipeline/study.py STUDY.yaml``), its stages here
(``--local``, ``--jobs`` at once), or one SLURM job per unfinished stage chained by ``afterok`` dependencies.
The study file itself (schema, stages, argv) is :mod:`pipeline.launch.study`."""
from __future__ import annotations

import argparse
import copy
import os
import shlex
import subprocess
import sys
import threading
import time
from typing import Sequence

from pipeline.launch import slurm
from pipeline.launch import study as study_file
from pipeline.launch.local_workers import child_env
from pipeline.launch.study import Stage, Study, StudyError, load_study
from pipeline.launch.task import TrainTask
from pipeline.tracking import runs
from pipeline.tracking import store
from pipeline.train.config import REPO_ROOT
from pipeline.train.exit_codes import EXIT_USAGE
from ssal_datasets.cpus import usable_cpus


def stage_status(study: Study) -> dict[str, str]:
    """stage -> 'finished' | 'unfinished' | 'new' from MLflow runs tagged study/stage (and outputs)."""
    try:
        client = runs.client(runs.resolve_uri(study.uri, study.runs_root))
        tagged = runs.study_runs(client, study.id)
    except Exception as err:  # noqa: BLE001
        raise StudyError(f"cannot read the tracking store {study.uri} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else ''}); is the server up?") from None
    status = {}
    for name, stage in study.stages.items():
        mine = [r for r in tagged if r.data.tags.get("stage") == name]
        if any(r.info.status == "FINISHED" for r in mine) and (stage.kind != "groups" or stage.output.is_file()):
            status[name] = "finished"
        elif mine:
            status[name] = "unfinished"
        else:
            status[name] = "new"
    return status


def describe(study: Study, status: dict[str, str] | None = None) -> str:
    lines = [f"study '{study.id}' ({study.path}): {len(study.stages)} stages; MLflow experiment "
             f"'{study.experiment}' at {study.uri}; outputs in {study.dir}"]
    for stage in study.stages.values():
        state = f" [{status[stage.name]}]" if status else ""
        deps = f" after {', '.join(stage.deps)}" if stage.deps else ""
        lines.append(f"  {stage.name:<14} {stage.kind:<8}{deps}{state}")
    return "\n".join(lines)


def stage_command(stage: Stage, threads: int = 0) -> list[str]:
    """The stage's command line; ``threads`` > 0: a training stage's torch threads (unless its overrides set them)."""
    argv = list(stage.argv)
    if threads and stage.kind == "train" and not any(arg.startswith("train.threads=") for arg in argv):
        argv.append(f"train.threads={threads}")
    return [sys.executable, "-m", stage.module, *argv]


class _RunningStage:
    """A stage's process; with others beside it, its output is read here and printed with its name in front."""

    def __init__(self, stage: Stage, cmd: list[str], env: dict, tagged: bool, print_lock: threading.Lock):
        self.stage, self.started = stage, time.perf_counter()
        out, err = (subprocess.PIPE, subprocess.STDOUT) if tagged else (None, None)
        self.proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, stdout=out, stderr=err)
        self.reader = None
        if tagged:
            self.reader = threading.Thread(target=self._copy, args=(print_lock,), daemon=True)
            self.reader.start()

    def _copy(self, print_lock: threading.Lock) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            with print_lock:
                print(f"[{self.stage.name}] {line}", flush=True)

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None and self.reader is not None:
            self.reader.join()  # its last lines before the stage's end line
        return rc


def run_local(study: Study, dry_run: bool = False, env: dict | None = None, jobs: int | None = None) -> int:
    """Run the unfinished stages here, up to ``jobs`` at once (default: the study's ``local_jobs``): a stage
    starts once its dependencies finished, in file order among those ready; with jobs > 1 every training stage
    gets this machine's cores / jobs threads and each line of a stage's output starts with its name. A
    failed stage blocks what depends on it; independent stages still run. Exit 0 iff every stage is finished."""
    if jobs is not None and jobs < 1:
        raise StudyError(f"--jobs {jobs}: takes N >= 1 (stages run at once with --local)")
    jobs = jobs or study.local_jobs
    threads = max(1, usable_cpus() // jobs) if jobs > 1 else 0
    status = stage_status(study)
    print(describe(study, status), flush=True)
    if jobs > 1 and not dry_run:
        print(f"[study] up to {jobs} stages at once, {threads} torch thread(s) each (--jobs)", flush=True)
    outcome: dict[str, str] = {}
    running: dict[str, _RunningStage] = {}
    pending = list(study.stages.values())
    ran_any = False
    env = child_env(env or os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # the light stages (lc, CAMs) too
    print_lock = threading.Lock()  # whole lines: the stages' output is printed by a thread each

    def say(line: str) -> None:
        with print_lock:
            print(line, flush=True)

    try:
        while pending or running:
            for stage in list(pending):
                if any(d not in outcome for d in stage.deps):
                    continue  # a dependency still runs or waits
                blocked = [d for d in stage.deps if outcome[d] not in ("done", "skipped")]
                if blocked:
                    outcome[stage.name] = "blocked"
                    say(f"[study] {stage.name}: not run (dependency {', '.join(blocked)} did not finish)")
                elif status[stage.name] == "finished" and not (stage.kind == "report" and ran_any):
                    outcome[stage.name] = "skipped"
                    say(f"[study] {stage.name}: finished earlier, skipped")
                elif len(running) < jobs or dry_run:
                    cmd = stage_command(stage, threads)
                    say(f"[study] {stage.name} ({stage.kind}): {shlex.join(cmd)}")
                    if dry_run:
                        outcome[stage.name] = "done"
                    else:
                        running[stage.name] = _RunningStage(stage, cmd, env, tagged=jobs > 1, print_lock=print_lock)
                        ran_any = True
                else:
                    continue  # no free slot yet
                pending.remove(stage)
            for name, run in list(running.items()):
                rc = run.poll()
                if rc is None:
                    continue
                del running[name]
                outcome[name] = "done" if rc == 0 else "failed"
                say(f"[study] {name}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in "
                    f"{time.perf_counter() - run.started:.0f} s")
            if running:
                time.sleep(0.2)
    finally:
        for run in running.values():  # the study was interrupted: each stage checkpoints and stops (SIGTERM)
            try:
                run.proc.terminate()
                run.proc.wait()
            except KeyboardInterrupt:  # a second Ctrl-C: now
                run.proc.kill()
    failed = [n for n, o in outcome.items() if o in ("failed", "blocked")]
    print("[study] summary: " + ", ".join(f"{n} {outcome[n]}" for n in study.stages if n in outcome), flush=True)
    if failed:
        print(f"[study] {len(failed)} stage(s) not finished; fix the cause and re-run the same command "
              f"(finished stages are skipped)", file=sys.stderr, flush=True)
        return 1
    print(f"[study] table: python pipeline/report.py --study {study.id} --tracking-uri {study.uri}", flush=True)
    print(f"[study] runs: {store.experiment_link(study.uri, study.experiment) or study.uri}", flush=True)
    return 0


def stage_settings(study: Study, stage: Stage, base: dict) -> dict:
    """The launcher settings of one stage's job: the CLI/profile ones, narrowed for the light stages."""
    settings = copy.deepcopy(base)
    if stage.kind in ("groups", "report"):
        settings.update(nodes=1, gpus_per_node=0, tasks_per_node=1)
    elif stage.kind in ("lc", "explain"):
        gpus = 1 if base.get("gpus_per_node") else 0
        settings.update(nodes=1, gpus_per_node=gpus, tasks_per_node=1)
    for key, value in stage.slurm.items():
        settings[key] = ({**settings[key], **value} if isinstance(settings.get(key), dict) and isinstance(value, dict)
                         else value)
    if settings["gpus_per_node"]:
        settings["tasks_per_node"] = settings["gpus_per_node"]
    settings["sbatch"] = dict(settings.get("sbatch") or {})
    return settings


def live_jobs(study: Study) -> dict[str, tuple[str, str]]:
    """stage -> (id, state) of a job this study submitted for it earlier that is still queued or running.

    The ids are the job folders under ``<study dir>/slurm/<stage>/`` (submitit's ``%j``); squeue says which of
    them are alive (by job name, so that long-gone ids are no error). Without SLURM's clients, or without
    earlier submissions, nothing is alive."""
    recorded = {name: {folder.name for folder in (study.dir / "slurm" / name).glob("*")
                       if folder.is_dir() and folder.name.isdigit()}
                for name in study.stages}
    if not any(recorded.values()):
        return {}
    names = ",".join(f"{study.id}-{name}" for name, ids in recorded.items() if ids)
    try:
        proc = subprocess.run(["squeue", "-h", "-o", "%i|%T|%j", f"--name={names}"], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        print(f"[study] warning: cannot ask squeue which earlier jobs are still queued ({err}); submitting "
              f"every unfinished stage", file=sys.stderr, flush=True)
        return {}
    if proc.returncode != 0:
        print(f"[study] warning: squeue failed ({proc.stderr.strip()[:200]}); submitting every unfinished stage",
              file=sys.stderr, flush=True)
        return {}
    live: dict[str, tuple[str, str]] = {}
    for line in proc.stdout.splitlines():
        job, _, rest = line.strip().partition("|")
        state, _, name = rest.partition("|")
        stage = name[len(study.id) + 1:]
        newest = int(job) >= int(live.get(stage, ("0",))[0])
        if state in slurm.STILL_TO_RUN_STATES and job in recorded.get(stage, ()) and newest:
            live[stage] = (job, state)
    return live


def submit_slurm(study: Study, settings: dict, dry_run: bool = False, make_executor=None) -> dict[str, str]:
    """Submit one job per unfinished stage with afterok dependencies. Returns stage -> job id.

    A stage whose earlier job is still queued or running (``live_jobs``) is not submitted again: stages
    submitted now depend on that job. The report is the exception when something new is submitted: a new
    report job follows everything, the old one is cancelled if it is still waiting (or, if it is running
    already, the new one starts after it). If a submission fails, the jobs submitted before it are cancelled
    and a LaunchError names the stage and sbatch's message (:func:`pipeline.launch.slurm.submit`)."""
    if make_executor is None:
        make_executor = slurm.make_executor
    status = stage_status(study)
    print(describe(study, status), flush=True)
    live = live_jobs(study)
    job_ids: dict[str, str] = {}  # stage -> the job it waits for: submitted now, or one still in the queue
    submitted: list[str] = []
    for stage in study.stages.values():
        if status[stage.name] == "finished" and not (stage.kind == "report" and submitted):
            print(f"[study] {stage.name}: finished earlier, skipped", flush=True)
            continue
        superseded = live.get(stage.name) if stage.kind == "report" and submitted else None
        if stage.name in live and not superseded:
            job_ids[stage.name] = live[stage.name][0]
            print(f"[study] {stage.name}: job {live[stage.name][0]} is still in the queue, not submitted again",
                  flush=True)
            continue
        job_settings = stage_settings(study, stage, settings)
        deps = [job_ids[d] for d in stage.deps if d in job_ids]
        if deps:
            job_settings["sbatch"]["dependency"] = "afterok:" + ":".join(deps)
            job_settings["sbatch"]["kill-on-invalid-dep"] = "yes"
        if superseded:  # never two reports at once in the same folder (a cancelled one satisfies afterany)
            job_settings["sbatch"]["dependency"] = ",".join(filter(None, [job_settings["sbatch"].get("dependency"),
                                                                          f"afterany:{superseded[0]}"]))
        folder = study.dir / "slurm" / stage.name
        run_dirs = [stage.output] if stage.kind == "train" else []  # training stages restart after a failure
        task = TrainTask(argv=list(stage.argv), entry=stage.entry, max_requeues=job_settings["max_requeues"],
                         env={str(k): str(v) for k, v in job_settings["env"].items()},
                         run_dir=str(stage.output) if run_dirs else None)
        if dry_run:
            job_ids[stage.name] = f"<{stage.name}>"
            submitted.append(job_ids[stage.name])
            gpus = job_settings["gpus_per_node"]
            print(f"[study] would submit {stage.name} ({stage.kind}): {job_settings['nodes']} node(s) x "
                  f"{job_settings['tasks_per_node']} task(s){', ' + str(gpus) + ' GPU/node' if gpus else ''}"
                  f"{', dependency ' + job_settings['sbatch']['dependency'] if deps else ''}\n    {stage.entry} "
                  f"{shlex.join(stage.argv)}", flush=True)
            continue
        [job] = slurm.submit(lambda: make_executor(folder, job_settings, f"{study.id}-{stage.name}",
                                                   restart_run_dirs=run_dirs), [task],
                             f"submitting stage {stage.name}", submitted_before=submitted)
        job_ids[stage.name] = str(job.job_id)
        submitted.append(str(job.job_id))
        print(f"[study] submitted {stage.name} ({stage.kind}) as job {job.job_id}"
              f"{' after ' + ','.join(deps) if deps else ''}; logs in {folder}", flush=True)
        if superseded and superseded[1] == "PENDING" and slurm.cancel_jobs([superseded[0]]):
            print(f"[study] {stage.name}: cancelled its earlier job {superseded[0]}, which was still waiting "
                  f"(job {job.job_id} follows the new stages)", flush=True)
    if not job_ids:
        print("[study] every stage is finished; nothing submitted", flush=True)
    elif not submitted:
        print("[study] every unfinished stage is still in the queue; nothing submitted", flush=True)
    else:
        print(f"[study] follow: squeue -u $USER; re-run the same command after a failure (finished stages are "
              f"skipped); table: python pipeline/report.py --study {study.id} --tracking-uri {study.uri}", flush=True)
    return {name: job_ids[name] for name in job_ids if job_ids[name] in submitted}


def launch_study(args: argparse.Namespace) -> int:
    """Called by ``pipeline/launch.py --study``: --local runs here, otherwise SLURM jobs."""
    try:
        if args.config or args.array:
            raise StudyError("--study takes its recipes from the study file: drop --config / --array "
                             "(key=value overrides apply to every training stage)")
        unused = [flag for flag in ("output_dir", "resume", "wait") if getattr(args, flag, None)]
        if unused:
            raise StudyError(f"--study does not take {', '.join('--' + flag.replace('_', '-') for flag in unused)} "
                             f"(stage folders come from the study; finished stages are skipped, the others resume)")
        if args.local:
            slurm_only = [flag for flag in ("partition", "nodes", "gpus_per_node", "cluster")
                          if getattr(args, flag, None)]
            if slurm_only:
                raise StudyError(f"--local does not take SLURM options "
                                 f"({', '.join('--' + flag.replace('_', '-') for flag in slurm_only)})")
        study = load_study(args.study, args.overrides)
        if args.local:
            return run_local(study, dry_run=getattr(args, "dry_run", False), jobs=args.jobs)
        if args.jobs is not None:
            raise StudyError("--jobs: stages run at once with --local (on SLURM every stage is its own job)")
        settings = slurm.slurm_settings(args)
        if not args.dry_run:
            slurm.require_slurm()
        submit_slurm(study, settings, dry_run=args.dry_run)
        return 0
    except (StudyError, slurm.LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python pipeline/study.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Show or run a study (a graph of training / groups / lc / explain / report stages). SLURM "
                    "submission: python pipeline/launch.py --study FILE [--cluster ...].",
        epilog=study_file.__doc__.split("\n\n", 1)[1] + "\n\nmore: docs/studies.md")  # the study file format
    parser.add_argument("study", help="study YAML (studies/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every training stage")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--status", action="store_true", help="print the plan and each stage's state (default)")
    mode.add_argument("--local", action="store_true", help="run the unfinished stages here (--jobs at once)")
    mode.add_argument("--dry-run", action="store_true", help="print each stage's command, run nothing")
    parser.add_argument("--jobs", type=int, metavar="N", help="--local: up to N stages at once, each training stage "
                        "with cores / N torch threads (default: the study's local_jobs, else 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        study = load_study(args.study, args.overrides)
        if args.local or args.dry_run:
            return run_local(study, dry_run=args.dry_run, jobs=args.jobs)
        status = stage_status(study)
        for name, (job, _) in live_jobs(study).items():
            if status[name] != "finished":
                status[name] += f", SLURM job {job} in the queue"
        print(describe(study, status))
        return 0
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
