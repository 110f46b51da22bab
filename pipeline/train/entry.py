"""Training entry point: `python -m pipeline.train --config FILE [--resume auto|PATH] [key=value ...]`.

The same entry runs as one process, under torchrun (one process per GPU), and inside SLURM tasks
started by submitit (``pipeline/launch/task.py``). It reads the arguments and the config, sets the
process up (signal handlers, process group, torch flags, the run folder's lock), runs a
:class:`pipeline.train.trainer.Trainer`, and turns the outcome into the exit code: 0 done, 2 bad
input (one line), 3 stopped with a checkpoint, 4 non-finite loss, 5 a rank hung (``exit_codes``, ``watchdog``),
1 anything else.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

from pipeline.tracking import credentials
from pipeline.train import checkpoint as ckpt
from pipeline.train import config as config_lib
from pipeline.train import dist as dist_util
from pipeline.train import engine, preemption, run_lock
from pipeline.train.config import Config, ConfigError
from pipeline.train.dist import AgreedConfigError, raise_if_any_rank
from pipeline.train.exit_codes import EXIT_NONFINITE, EXIT_USAGE
from pipeline.train.trainer import Trainer
from pipeline.train.watchdog import collective_timeout_s



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Train a ResNet with auxiliary branches (SSAL / DKS / DS / GapCat / MAXL) on FFCV betons. "
                    "Runs as one process, under torchrun, or in SLURM tasks (see pipeline/launch.py).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: section.key=value (value parsed as YAML), e.g. optim.lr=0.1 method.num_groups=[8,16]\n"
               "keys and defaults:\n" + config_lib.describe_keys()
               + "\n\nmore: docs/configuration.md (recipes, overrides), docs/methods.md (method options)",
    )
    parser.add_argument("--config", help="YAML recipe (default: the embedded demo job)")
    parser.add_argument("--resume", default="", help="'auto': continue the run in the output dir if it has a "
                                                     "checkpoint (same MLflow run); or a checkpoint path")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser


def configure_torch(cfg: Config) -> None:
    """Process-wide torch settings of the run (deterministic algorithms or cuDNN autotuning; TF32)."""
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def main(argv: list[str] | None = None) -> int:
    """One training run in this process (one rank of it); returns the exit code (see above)."""
    args = build_parser().parse_intermixed_args(argv)  # key=v --resume auto key2=v2, as launch.py takes it
    try:
        cfg = config_lib.load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    preemption.install_handlers()
    info = dist_util.init_distributed_mode(cfg.train.device, collective_timeout_s(cfg.train.hang_timeout_s))
    configure_torch(cfg)
    trainer = None
    lock = None
    status = "FAILED"
    try:
        busy = None
        if info.is_main:  # before anything reads or writes the run folder
            try:
                lock = run_lock.acquire(cfg.run_dir)
                if cfg.tracking.enabled:  # a refusal is the user's to fix, not an outage to journal through
                    credentials.check_server_accepts(cfg.tracking.uri)
            except (run_lock.RunFolderBusy, credentials.CredentialsError) as err:
                busy = str(err)
        raise_if_any_rank(info, busy)
        trainer = Trainer(cfg, info, args.resume)
        trainer.setup()
        started = time.perf_counter()
        metrics = trainer.fit()
        status = "FINISHED"
        if info.is_main:
            trainer.log_wall_seconds(time.perf_counter() - started)
            summary = {k: round(v, 4) for k, v in metrics.items() if k.startswith("val/top")}
            print(f"done: {json.dumps(summary)}", flush=True)
        return 0
    except (ConfigError, ckpt.CheckpointError) as err:
        if info.is_main or not isinstance(err, AgreedConfigError):
            print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except engine.Preempted as reason:
        # the checkpoint holds every rank's share of the interrupted epoch's sums; after the
        # resume rank 0 carries them on and the other ranks start from zero (no double count)
        trainer.meter = trainer.meter.summed_over_ranks(info.device)
        try:
            trainer.save()
        except ckpt.CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USAGE
        if preemption.will_requeue():
            status = None  # the requeued job continues this MLflow run
            if info.is_main:
                print(f"preempted ({reason}); checkpoint saved, requeue pending", flush=True)
        else:  # a plain stop, or a USR2 that nothing here will requeue (local run, torchrun)
            status = "KILLED"
            if info.is_main:
                print(f"stopped ({reason}); checkpoint saved to {trainer.run_dir / ckpt.LAST}; continue with "
                      f"--resume auto", flush=True)
        return preemption.EXIT_PREEMPTED
    except engine.NonFiniteLoss as err:
        print(f"error: rank {info.rank}: {err}; training stopped, the last good checkpoint is kept "
              f"({cfg.run_dir / ckpt.LAST})", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    except Exception as err:
        if isinstance(err, OSError) and ckpt.is_disk_full(err):
            print(f"error: {err.filename or cfg.run_dir}: not written, no space left on device; free space, then "
                  f"continue with --resume auto", file=sys.stderr, flush=True)
            return EXIT_USAGE
        print(f"error: rank {info.rank} of {info.world_size} failed:\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        return 1
    finally:
        if trainer is not None:
            trainer.watchdog.stop()
        if trainer is not None and getattr(trainer, "tracker", None) is not None and status is not None:
            trainer.tracker.end(status)
        dist_util.cleanup()
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
