"""Launch training: on this machine (``--local``) or as one SLURM job through submitit.

    python pipeline/launch.py --local [--nproc N] [--config CONFIG.yaml] [key=value ...]
    python pipeline/launch.py [--cluster NAME] --partition gpu --nodes 4 --gpus-per-node 8 \\
        [--cpus-per-task N] [--mem 64G] [--time HH:MM:SS] [--account A] [--qos Q] [--constraint C] \\
        [--job-name NAME] [--output-dir DIR] [--wait] [--array KEY=V1,V2,...] --config CONFIG.yaml [key=value ...]

The launcher is thin: it validates the config with the engine's schema (a bad config fails here, before
anything is submitted), builds a submitit executor, submits the engine's worker entry
(``pipeline.train.entry:main`` wrapped by ``pipeline.launch.task.TrainTask``) and returns. It never knows
about the training loop.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Sequence

from pipeline.launch import study_jobs
from pipeline.launch.arrays import expand_jobs, load_job_config
from pipeline.launch.local_workers import child_env, run_workers
from pipeline.launch.recipe_card import format_card, recipe_card
from pipeline.launch.slurm import (PROFILE_DIR, PROFILE_KEYS, JobSpec, LaunchError, check_cpus_per_task, follow,
                                   log_path, make_executor, missing_slurm_commands, require_slurm, slurm_settings, submit)
from pipeline.launch.task import TrainTask, resolve_entry
from pipeline.tracking import credentials, runs, store
from pipeline.tracking.constants import RUN_ID_FILE
from pipeline.train import restarts, run_lock
from pipeline.train.config import REPO_ROOT, Config, save_config, tracking_uri
from pipeline.train.exit_codes import EXIT_PREEMPTED, EXIT_USAGE, ORDERLY_EXITS


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    profiles = ", ".join(sorted(path.stem for path in PROFILE_DIR.glob("*.yaml"))) or "none"
    parser = argparse.ArgumentParser(
        prog="python pipeline/launch.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run training locally, or submit it as ONE SLURM job through submitit (one task per GPU,\n"
            "tasks_per_node = gpus_per_node; torch.distributed env from SLURM's; NCCL with GPUs, gloo without).\n"
            "The config is validated first: a bad config prints one line and exits 2, nothing is submitted.\n"
            "After submitting it prints the job id, the log paths and where the MLflow run is, and returns\n"
            "(--wait: follow rank 0's log until the job ends; the exit code is the job's)."),
        epilog=(
            "cluster profiles (slurm/NAME.yaml, or a path; flags override them): " + profiles + "\n"
            "  keys: " + ", ".join(PROFILE_KEYS) + "\n\n"
            "preemption / time limit: SLURM sends SIGUSR2 signal_delay_s before the end (sbatch --signal);\n"
            "  every rank stops at the next iteration, rank 0 writes an atomic checkpoint, the job requeues\n"
            "  itself (scontrol requeue) and continues with --resume auto in the same output dir and MLflow run.\n"
            "  Try it: scancel --signal=USR2 JOBID.  A plain `scancel JOBID` (SIGTERM) keeps the checkpoint and\n"
            "  marks the MLflow run KILLED; resume it with the same --output-dir and --resume auto.\n\n"
            "failures: a task killed or lost, a hang (train.hang_timeout_s) or a crash requeues the job from its\n"
            "  last checkpoint, at most max_restarts times (profile, default 3); not for exit 2 or 4, nor twice at\n"
            "  the same step. --local --nproc N --max-restarts K restarts local workers the same way.\n\n"
            "job arrays: --array KEY=V1,V2,... (repeatable: the cartesian product; KEY=config sweeps config\n"
            "  files) submits one array job, one element per combination, each in OUTPUT_DIR/<index>-<values>,\n"
            "  at most --array-parallelism running at once.\n\n"
            "examples:\n"
            "  python pipeline/launch.py --local                                  # the demo job, 1 process\n"
            "  python pipeline/launch.py --local --nproc 2 schedule.epochs=2      # 2 processes, gloo on CPU\n"
            "  python pipeline/launch.py --cluster example_gpu --nodes 4 --config configs/imagenet/resnet50_ssal3.yaml\n"
            "  python pipeline/launch.py --cluster testcluster --nodes 2 --wait   # slurm/testcluster.sh up first\n"
            "  python pipeline/launch.py --cluster testcluster --array train.seed=0,1,2 --array-parallelism 2\n\n"
            "more: docs/slurm.md (launching, SLURM, scaling out), docs/configuration.md (recipes, overrides),\n"
            "  docs/studies.md (--study), slurm/README.md (profiles, preemption, the SLURM test cluster)\n"),
    )
    group = parser.add_argument_group("what to run")
    group.add_argument("--config", help="YAML recipe (default: the embedded demo job)")
    group.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, section.key=value")
    group.add_argument("--resume", default=None, metavar="auto|PATH",
                       help="local: passed to the worker. SLURM: only 'auto' (continue the run in --output-dir); "
                            "SLURM jobs always restart with --resume auto after a requeue")
    group.add_argument("--entry", default="pipeline.train.entry:main", metavar="MODULE:FUNC",
                       help="worker entry taking argv and returning an exit code (default: %(default)s; for tests)")

    group = parser.add_argument_group("local")
    group.add_argument("--local", action="store_true", help="run on this machine instead of submitting")
    group.add_argument("--nproc", type=int, default=1,
                       help="local processes: 1 = in this process; N > 1 = N worker processes (gloo on CPU), "
                            "stopped together: SIGTERM / SIGUSR2 / Ctrl-C checkpoint and stop them (exit 3)")

    group = parser.add_argument_group("SLURM (flags override the --cluster profile)")
    group.add_argument("--cluster", metavar="NAME", help="profile slurm/NAME.yaml (or a path to a YAML file)")
    group.add_argument("--partition")
    group.add_argument("--nodes", type=int)
    group.add_argument("--gpus-per-node", type=int, dest="gpus_per_node")
    group.add_argument("--tasks-per-node", type=int, dest="tasks_per_node",
                       help="only without GPUs (default 1); with GPUs it is gpus_per_node")
    group.add_argument("--cpus-per-task", type=int, dest="cpus_per_task")
    group.add_argument("--mem", help="memory per node (sbatch syntax: 64G, 500M, 0 = all)")
    group.add_argument("--time", help="time limit: HH:MM:SS, D-HH:MM:SS or minutes")
    group.add_argument("--account")
    group.add_argument("--qos")
    group.add_argument("--constraint")
    group.add_argument("--job-name", dest="job_name", help="default: the run name")
    group.add_argument("--signal-delay", type=int, dest="signal_delay_s", metavar="S",
                       help="seconds between SIGUSR2 and the time limit (default from the profile, else 120)")
    group.add_argument("--max-requeues", type=int, dest="max_requeues",
                       help="requeues after preemption / the time limit (default from the profile, else 20)")
    group.add_argument("--max-restarts", type=int, dest="max_restarts", metavar="K",
                       help="restarts from the last checkpoint after a failure that is not the user's (a task "
                            "killed or lost, a hang, a crash; not exit 2 or a non-finite loss; not twice at the same "
                            "step): SLURM default from the profile, else 3; with --local --nproc N default 0")
    group.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="extra sbatch option (repeatable), e.g. --sbatch exclusive=true --sbatch reservation=x")
    group.add_argument("--output-dir", dest="output_dir",
                       help="run directory (checkpoints, MLflow run id, logs under slurm/); default: the config's")
    group.add_argument("--wait", action="store_true", help="follow rank 0's log until the job ends")
    group.add_argument("--array", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="submit a job array over these values (repeatable: cartesian product)")
    group.add_argument("--array-parallelism", type=int, dest="array_parallelism", metavar="N")
    group.add_argument("--dry-run", action="store_true",
                       help="print the recipe card (ranks, global batch, peak lr, epochs, steps per epoch, estimated "
                            "GPU-hours) and, for SLURM, the sbatch script(s); train and submit nothing (with --local too)")
    group = parser.add_argument_group("studies (pipeline/study.py)")
    group.add_argument("--study", metavar="STUDY.yaml",
                       help="run a multi-stage study (studies/*.yaml): --local runs its unfinished stages here "
                            "(--jobs at once); otherwise one SLURM job per stage with afterok dependencies (the SLURM "
                            "flags above apply to training stages); key=value overrides apply to every training stage")
    group.add_argument("--jobs", type=int, metavar="N",
                       help="--study --local: up to N stages at once, each training stage with cores / N torch "
                            "threads (default: the study's local_jobs, else 1)")
    return parser


# ----------------------------------------------------------------------------- local


def run_local(args: argparse.Namespace) -> int:
    overrides = ([f"output_dir={Path(args.output_dir).resolve()}"] if args.output_dir else []) + list(args.overrides)
    cfg = load_job_config(args.config, overrides, "config")  # fail fast, with the launcher's one-line message
    argv = (["--config", args.config] if args.config else []) + (["--resume", args.resume] if args.resume else [])
    argv += overrides
    if args.nproc < 1:
        raise LaunchError(f"--nproc: must be >= 1, got {args.nproc}")
    if args.max_restarts and (args.nproc == 1 or args.max_restarts < 0):
        raise LaunchError(f"--max-restarts {args.max_restarts}: takes K >= 0, and --local --nproc N (N >= 2: "
                          f"a supervisor process restarts the workers)")
    if args.dry_run:  # what would run, and nothing else
        print(format_card(recipe_card(cfg, 1, args.nproc, args.config or "the demo job (no --config)")))
        return 0
    try:  # fail before any worker starts; rank 0 holds the lock for the whole run
        run_lock.check_free(cfg.run_dir)
    except run_lock.RunFolderBusy as err:
        raise LaunchError(str(err)) from None
    if args.nproc == 1:
        return int(resolve_entry(args.entry)(argv) or 0)
    module = args.entry.split(":")[0]
    if args.entry.split(":")[1] != "main":
        raise LaunchError("--local --nproc N > 1 runs `python -m MODULE`: --entry must be MODULE:main")
    print(f"+ {args.nproc} x python -m {module} {shlex.join(argv)}", flush=True)
    job = f"local-{os.getpid()}"
    while True:
        ended = run_workers(module, argv, args.nproc, child_env(os.environ), str(REPO_ROOT))
        if ended.code in ORDERLY_EXITS or ended.stopped or not args.max_restarts:  # 0, 2, 3, 4: every rank's
            return ended.code
        # a rank that stopped (exit 3) did so on the SIGTERM this launcher sent after another rank failed
        codes = {rank: -signal.SIGTERM if code == EXIT_PREEMPTED else code for rank, code in ended.rank_codes.items()}
        verdict = restarts.decide(cfg.run_dir, codes, args.max_restarts, job, ended.ended_at)
        print(f"[launch] {verdict.line}", file=sys.stderr, flush=True)
        if not verdict.restart:
            return ended.code
        argv = resuming(argv)


def resuming(argv: list[str]) -> list[str]:
    """The worker argv with ``--resume auto`` in place of any ``--resume X``: a restart continues the run."""
    kept = [arg for i, arg in enumerate(argv) if arg != "--resume" and (i == 0 or argv[i - 1] != "--resume")]
    return ["--resume", "auto", *kept]


# ----------------------------------------------------------------------------- SLURM


def create_mlflow_run(cfg: Config, run_dir: Path, uri: str) -> tuple[str | None, str]:
    """Create the job's MLflow run now (status SCHEDULED) and leave its id in the run dir, where the engine
    picks it up (and turns it RUNNING): the launcher can print the run's link at once. Best effort: if the
    tracking store cannot be reached, the engine creates the run when the job starts."""
    if not cfg.tracking.enabled:
        return None, "tracking disabled (tracking.enabled=false)"
    # a tracking server that does not answer must not hold the submission up for minutes of retries
    try:
        import mlflow

        with store.http_limits(timeout=5, retries=0):
            client = mlflow.MlflowClient(tracking_uri=uri)
            earlier_run_id = runs.recorded_run_id(run_dir)
            if earlier_run_id:  # --resume auto of an earlier run
                run = client.get_run(earlier_run_id)
            else:
                exp_id = store.get_or_create_experiment(client, uri, cfg.tracking.experiment)
                run = client.create_run(exp_id, run_name=cfg.run_name, tags={"tracking.run_dir": str(run_dir)})
                client.update_run(run.info.run_id, status="SCHEDULED")
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / RUN_ID_FILE).write_text(run.info.run_id)
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
    except Exception as err:  # noqa: BLE001 - never block a submission on tracking
        return None, f"(run created when the job starts; {type(err).__name__}: {str(err).splitlines()[0][:120]})"
    return run_id, store.where_to_view(uri, experiment_id, run_id)


def submit_slurm(args: argparse.Namespace) -> int:
    from pipeline.train.checkpoint import LAST  # here: the checkpoint module imports torch

    settings = slurm_settings(args)
    if args.resume not in (None, "", "auto"):
        raise LaunchError("--resume: SLURM jobs take only --resume auto (continue the run in --output-dir)")
    jobs = expand_jobs(args, args.output_dir)  # every config validated before anything is submitted
    check_cpus_per_task(settings, jobs)
    for job in jobs:
        held = [name for name in (LAST, RUN_ID_FILE) if (job.run_dir / name).is_file()]
        if held and args.resume != "auto":
            raise LaunchError(f"output dir {job.run_dir} already holds a run ({', '.join(held)}): pass --resume auto "
                              f"to continue it, or choose another --output-dir")
    if not args.dry_run:
        require_slurm()
    tasks = []
    for job in jobs:
        cfg = dataclasses.replace(job.cfg, output_dir=str(job.run_dir))
        cfg_path = job.run_dir / "slurm" / "submitted_config.yaml"
        if not args.dry_run:
            save_config(cfg, cfg_path)  # exactly what was validated; the job reads it on every (re)start
        tasks.append(TrainTask(argv=["--config", str(cfg_path), "--resume", "auto"], entry=args.entry,
                               max_requeues=settings["max_requeues"], run_dir=str(job.run_dir),
                               env={str(k): str(v) for k, v in settings["env"].items()}))

    first = jobs[0]
    folder = (first.run_dir if len(jobs) == 1 else first.run_dir.parent) / "slurm"
    job_name = args.job_name or (first.cfg.run_name if len(jobs) == 1 else f"{first.cfg.tracking.experiment}-array")
    run_dirs = [job.run_dir for job in jobs]
    if args.dry_run:
        print_dry_run(make_executor(folder, settings, job_name, script_only=True, restart_run_dirs=run_dirs),
                      settings, jobs, tasks, args.config or "the demo job (no --config)")
        return 0

    uris = [tracking_uri(job.cfg) for job in jobs]
    for uri in sorted({uri for job, uri in zip(jobs, uris) if job.cfg.tracking.enabled}):
        try:  # before anything is submitted: a job would stop on it anyway
            credentials.check_server_accepts(uri)
        except credentials.CredentialsError as err:
            raise LaunchError(str(err)) from None
    links = [create_mlflow_run(job.cfg, job.run_dir, uri) for job, uri in zip(jobs, uris)]
    try:
        submitted = submit(lambda: make_executor(folder, settings, job_name, restart_run_dirs=run_dirs), tasks,
                           "submission")
    except LaunchError:
        for job, uri, (run_id, _) in zip(jobs, uris, links):  # leave no SCHEDULED run behind
            _end_scheduled_run(uri, run_id, job.run_dir)
        raise
    for uri, (run_id, _), slurm_job in zip(uris, links, submitted):
        _tag_runs(uri, [run_id], [slurm_job.job_id])
    ntasks = settings["nodes"] * settings["tasks_per_node"]
    for job, slurm_job, (_, link) in zip(jobs, submitted, links):
        print(f"submitted job {slurm_job.job_id}: {settings['nodes']} node(s) x {settings['tasks_per_node']} task(s) = "
              f"{ntasks} rank(s), partition {settings['partition'] or '(default)'}"
              f"{'  [' + job.label + ']' if job.label else ''}", flush=True)
        print(f"  run dir: {job.run_dir}")
        print(f"  logs:    {log_path(slurm_job, 'out')}")
        print(f"           {log_path(slurm_job, 'err')}   (rank r: _{{r}}_log.*)")
        print(f"  MLflow:  experiment '{job.cfg.tracking.experiment}': {link}")
    print(f"  follow:  squeue -j {submitted[0].job_id.split('_')[0]}; preempt: scancel --signal=USR2 JOBID; "
          f"stop: scancel JOBID", flush=True)
    if not args.wait:
        return 0
    codes = [follow(slurm_job, job, uri) for job, slurm_job, uri in zip(jobs, submitted, uris)]
    return max(codes)


def print_dry_run(executor, settings: dict, jobs: Sequence[JobSpec], tasks: Sequence[TrainTask],
                  args_config: str | None) -> None:
    """The sbatch script that would be submitted (an array's --array line added), each job's argv and recipe card."""
    # submitit has no public call that renders the script without submitting it
    text = executor._make_submission_file_text(executor._submitit_command_str, "DRYRUN")
    if len(jobs) > 1:
        text = text.replace("#SBATCH --job-name", f"#SBATCH --array=0-{len(jobs) - 1}%"
                            f"{min(len(jobs), settings['array_parallelism'])}\n#SBATCH --job-name")
    print(text)
    for job, task in zip(jobs, tasks):
        print(f"# {job.label or 'job'}: {job.run_dir}  argv: {shlex.join(task.argv)}")
        card = recipe_card(job.cfg, settings["nodes"], settings["tasks_per_node"], job.label or args_config)
        print(format_card(card))
    missing = missing_slurm_commands()
    if missing:
        print(f"# SLURM not found on this machine ({' and '.join(missing)} not on PATH): the script above is "
              f"what would be submitted; a real submission needs a SLURM login node")


def _end_scheduled_run(uri: str, run_id: str | None, run_dir: Path) -> None:
    """Delete the MLflow run made for a job that was not submitted after all (and its run-id file)."""
    if not run_id:
        return
    try:
        import mlflow

        with store.http_limits(timeout=5, retries=0):
            client = mlflow.MlflowClient(tracking_uri=uri)
            if client.get_run(run_id).info.status == "SCHEDULED":
                client.delete_run(run_id)
                (run_dir / RUN_ID_FILE).unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 - best effort
        pass


def _tag_runs(uri: str, run_ids: Sequence[str | None], job_ids: Sequence[str]) -> None:
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        for run_id, job_id in zip(run_ids, job_ids):
            if run_id:
                client.set_tag(run_id, "slurm.job_id", job_id)
    except Exception:  # noqa: BLE001 - best effort
        pass


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.study:
        return study_jobs.launch_study(args)
    if args.jobs is not None:
        print("error: --jobs: stages run at once by --study STUDY.yaml --local (a single run: --nproc)", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.local:
            slurm_only = [flag for flag in ("partition", "nodes", "gpus_per_node", "cluster", "array", "wait")
                          if getattr(args, flag)]
            if slurm_only:
                raise LaunchError(f"--local does not take SLURM options "
                                  f"({', '.join('--' + flag.replace('_', '-') for flag in slurm_only)})")
            return run_local(args)
        return submit_slurm(args)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
