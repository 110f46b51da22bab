"""The ``Trainer``: one training run, composed from the worker's parts.

``Trainer(cfg, info, resume)`` decides where the run starts (a new run folder, or the checkpoint that
``--resume`` names). ``setup()`` builds the run: the data set and its loaders (``ssal_datasets``), the label
space, groupings, holdout split and model (``factory``), the DDP / ``torch.compile`` wrappers, the method's
training (``Trainer.method_training``: ``engine.StandardTraining`` or ``maxl_training.MaxlTraining``, the
optimisers and one step), the EMA copy, the tracker and the metrics journal; then it loads the checkpoint.
``fit()`` runs the epochs through ``engine.train_one_epoch`` and ``engine.evaluate``, saves a checkpoint after
each (``checkpoint``), logs the epoch once that is on disk (``metrics_journal``), and logs the final artifacts.

It raises ``engine.Preempted`` (every rank, at the same step) and ``engine.NonFiniteLoss``; what follows
(the mid-epoch save, the exit code, the MLflow run's status) is the entry's, :mod:`pipeline.train.entry`.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipeline.tracking import runs
from pipeline.tracking.constants import RUN_ID_FILE
from pipeline.tracking.tracker import NullTracker, Tracker
from pipeline.train import checkpoint as ckpt
from pipeline.train import config as config_lib
from pipeline.train import data_access, engine, preemption, restarts
from pipeline.train import dist as dist_util
from pipeline.train.checkpoint_clock import CheckpointClock, save_mid_epoch
from pipeline.train.config import Config, ConfigError, tracking_uri
from pipeline.train.factory import (Relabelled, arch_label, build_model, data_problem, ensure_dataset, holdout_split,
                                     label_space, load_groupings, method_training_class)
from pipeline.train.metrics_journal import MetricsJournal
from pipeline.train.optim import build_optimizer, lr_factor, scaled_lr
from pipeline.train.watchdog import Watchdog
from ssal_datasets.manifest import read_manifest


def make_tracker(cfg: Config, info: dist_util.DistInfo, run_dir: Path):
    """Rank 0's MLflow tracker (a NullTracker on other ranks, or with tracking.enabled false)."""
    if not (cfg.tracking.enabled and info.is_main):
        return NullTracker()
    return Tracker(uri=tracking_uri(cfg), experiment=cfg.tracking.experiment, run_dir=str(run_dir))


def run_tags(cfg: Config, info: dist_util.DistInfo, groupings) -> dict[str, str]:
    tags = {
        "method": cfg.method.name,
        "arch": arch_label(cfg.model),
        "dataset": cfg.data.dataset,
        "world_size": str(info.world_size),
        "branches": str(len(groupings) if groupings is not None else len(cfg.method.options.get("stages", []) or [])),
        "groups": ",".join(str(int(g.max()) + 1) for g in groupings) if groupings is not None else "",
        "git_commit": _git_commit(),
    }
    tags.update(cfg.tracking.tags)
    return tags


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


class Trainer:
    """Holds one run's state; `fit()` trains to the end or raises (Preempted, NonFiniteLoss)."""

    def __init__(self, cfg: Config, info: dist_util.DistInfo, resume: str):
        self.cfg, self.info = cfg, info
        self.run_dir = cfg.run_dir
        self.resume_path = self._resume_path(resume)
        self.checkpoint_clock = CheckpointClock(cfg.checkpoint.every_minutes, decides=info.is_main)
        self.watchdog = Watchdog(self.run_dir, info.rank, info.world_size, cfg.train.hang_timeout_s)

    def _resume_path(self, resume: str) -> Path | None:
        last = self.run_dir / ckpt.LAST
        if resume == "auto":
            return last if last.is_file() else None
        if resume:
            path = Path(resume)
            if not path.is_file():
                raise ConfigError(f"--resume: no such checkpoint {resume}")
            return path
        if last.is_file():
            raise ConfigError(f"output dir {self.run_dir} already holds a run; pass --resume auto to continue it, "
                              f"or choose another tracking.run_name / output_dir")
        return None

    def setup(self) -> None:
        cfg, info = self.cfg, self.info
        from ssal_datasets import loader as data_loader  # FFCV and numba: loaded only for a run that trains

        data_root = ensure_dataset(cfg, info)
        try:
            manifest = read_manifest(data_root)
        except ValueError as err:  # the manifest's own checks: the message names the file
            raise ConfigError(f"data.root: {err}") from None
        missing = [split for split in ("train", "val") if split not in manifest["splits"]]
        if missing:
            raise ConfigError(f"data.root: {data_root / 'manifest.json'} has no {' and no '.join(missing)} split; "
                              f"write the data set with `python datasets/write_ffcv.py {cfg.data.dataset} --out {data_root}`")
        dist_util.raise_if_any_rank(info, data_problem(cfg, data_root, manifest))
        self.num_classes, self.class_names, label_table = label_space(cfg, manifest)
        grouped = cfg.method.name in config_lib.GROUPED_METHODS
        self.groupings = load_groupings(cfg, self.num_classes) if grouped else None
        ckpt.seed_everything(cfg.train.seed)
        model = build_model(cfg, self.num_classes, self.groupings)

        device = info.device
        self.amp = cfg.train.amp if device.type == "cuda" else "none"
        self.channels_last = cfg.train.channels_last and device.type == "cuda"
        batch = cfg.data.batch_size
        train_beton = data_root / manifest["splits"]["train"]["beton"]
        train_indices, holdout_indices = holdout_split(int(manifest["splits"]["train"]["count"]),
                                                       cfg.eval.holdout_fraction, cfg.train.seed)
        if info.is_main:
            for line in data_access.access_warnings(train_beton, cfg.data.order, cfg.data.os_cache,
                                                    data_access.node_memory_bytes(), dist_util.local_world_size()):
                print(f"warning: {line}", file=sys.stderr, flush=True)
        try:  # a beton missing or damaged (truncated...): the loaders' message names the file
            self.train_loader = data_loader.create_train_loader(
                train_beton, batch_size=batch, num_workers=cfg.data.num_workers, resolution=cfg.data.min_res,
                device=device, distributed=info.distributed, seed=cfg.train.seed,
                order=data_access.loader_order(cfg.data.order, cfg.data.os_cache), os_cache=cfg.data.os_cache,
                channels_last=self.channels_last, indices=train_indices, scale=tuple(cfg.data.rrc_scale),
                color_jitter=cfg.data.color_jitter)
            self.holdout_loader = None
            if holdout_indices is not None:
                self.holdout_loader = data_loader.create_val_loader(
                    train_beton, batch_size=cfg.data.val_batch_size, num_workers=cfg.data.num_workers,
                    resolution=cfg.data.val_res, device=device, distributed=info.distributed,
                    channels_last=self.channels_last, indices=holdout_indices, os_cache=cfg.data.os_cache,
                    preprocess=cfg.data.val_preprocess)
            self.val_loader = data_loader.create_val_loader(
                data_root / manifest["splits"]["val"]["beton"], batch_size=cfg.data.val_batch_size,
                num_workers=cfg.data.num_workers, resolution=cfg.data.val_res, device=device,
                distributed=info.distributed, channels_last=self.channels_last, preprocess=cfg.data.val_preprocess)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"data.root: {err}; check the folder with "
                              f"`python datasets/write_ffcv.py verify --out {data_root}`") from None
        if label_table is not None:
            self.train_loader, self.val_loader = Relabelled(self.train_loader, label_table), \
                Relabelled(self.val_loader, label_table)
            if self.holdout_loader is not None:
                self.holdout_loader = Relabelled(self.holdout_loader, label_table)
        self.resolution_for_epoch = data_loader.resolution_for_epoch
        # FFCV sets torch's thread count to its worker count: reset it for CPU training
        threads = cfg.train.threads or dist_util.cpus_per_rank()
        torch.set_num_threads(threads)

        self.steps_per_epoch = len(self.train_loader)
        if cfg.train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.max_steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.batch_size: {batch} x {info.world_size} processes is larger than the "
                              f"train split; lower data.batch_size")

        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model_without_ddp = model
        self.ema = None
        if cfg.train.ema_decay > 0:
            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
        training_class = method_training_class(cfg.method.name)
        training_class.prepare_model(model)  # before DDP wraps it (MAXL: the generator stays out of DDP)
        train_model: nn.Module = model
        if info.distributed:
            # train.deterministic: find_unused_parameters=True keeps DDP's first gradient buckets for the whole
            # run. Otherwise DDP re-buckets after the first iteration of every *process*, so the first step after a
            # resume sums the ranks' gradients in another order than the uninterrupted run did: bit-exact with 2
            # ranks (a + b = b + a), not with more (bench/slurm_scale.sh, 16 ranks). It costs an autograd-graph
            # walk every step, so a run that is not deterministic (the GPU recipes: NCCL and cuDNN are not
            # bit-exact anyway) goes without; every method uses all its DDP parameters every step
            # (tests/test_sync_free_step.py). No buffer broadcast before each forward: BN statistics are
            # averaged over ranks when read (Trainer.average_bn_statistics).
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=cfg.train.deterministic, broadcast_buffers=False,
                gradient_as_bucket_view=True)
        if cfg.train.compile:
            # static shapes: progressive resizing trains at a few resolutions, each compiled once for its
            # own shapes (a guard fails at the new size and recompiles) instead of the one dynamic-shape graph
            # that the default would fall back to at the second size (slower kernels, for the whole run)
            train_model = torch.compile(train_model, dynamic=False)
        self.global_batch = batch * info.world_size
        self.peak_lr = scaled_lr(cfg.optim, self.global_batch)
        self.method_training = training_class(
            model, train_model, build_optimizer(model, cfg.optim, self.global_batch), self.peak_lr, device=device,
            amp=self.amp, grad_clip_norm=cfg.optim.grad_clip_norm, channels_last=self.channels_last)
        if cfg.optim.label_smoothing and hasattr(model.method, "label_smoothing"):
            model.method.label_smoothing = cfg.optim.label_smoothing

        # state that the checkpoint carries
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.meter = engine.EpochMeter()
        self.best_top1 = -1.0
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.run_id = None
        if self.resume_path is not None:
            self._load(self.resume_path)
        if self.run_id is None:  # preempted before the first checkpoint: the launcher's / first start's run
            self.run_id = runs.recorded_run_id(self.run_dir)
        self.tracker = make_tracker(cfg, info, self.run_dir)
        self.journal = MetricsJournal(self.run_dir, self.tracker, enabled=info.is_main and cfg.tracking.enabled)
        self.trained = False  # whether this process trained (a finished run resumed only re-evaluates)
        self.bn_averaged = True  # every rank holds the same BN statistics (same seed, or the same checkpoint)

    def average_bn_statistics(self) -> None:
        """Make the BN running statistics (the model's and the EMA copy's) the mean over ranks before they are
        read: evaluation, checkpoint. Collective. train.deterministic averages after every step instead
        (after_step in fit): the ranks then never differ, and a mid-epoch resume stays bit-exact, since an
        average taken at a save would round differently from the uninterrupted run's. Both give the same
        values up to rounding: the running statistics, and the EMA of them (use_buffers=True), are linear in
        the batch statistics. Training reads batch statistics only: the weights are unaffected."""
        if self.bn_averaged:
            return
        dist_util.average_bn_statistics(self.model_without_ddp, *([self.ema.module] if self.ema is not None else []))
        self.bn_averaged = True

    # -- checkpoints

    def _state(self) -> dict:
        return {
            "model": self.model_without_ddp.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "training": self.method_training.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "loader_epoch": self.epoch,
            "meter": self.meter.state(),
            "best_top1": self.best_top1,
            "history": self.history,
            "rng": ckpt.rng_state(),
            "mlflow_run_id": self.run_id,
            "config": self.cfg.to_dict(),
            "groupings": [g.tolist() for g in self.groupings] if self.groupings is not None else None,
        }

    def save(self, name: str = ckpt.LAST, *links: str) -> None:
        """Collective (the BN statistics are averaged first); rank 0 writes the checkpoint `name` once, and
        each of `links` becomes a hard link to it."""
        self.watchdog.idle()
        self.average_bn_statistics()
        if self.info.is_main:
            self._note_run_id()
            ckpt.save_checkpoint(self._state(), self.run_dir / name, also=[self.run_dir / link for link in links])
        self.checkpoint_clock.saved()

    def _note_run_id(self) -> None:
        """The tracker may learn its run id late (server down at start): keep the newest one."""
        run_id = getattr(self.tracker, "run_id", None) or self.run_id
        if run_id and run_id != self.run_id or run_id and not (self.run_dir / RUN_ID_FILE).is_file():
            self.run_id = run_id
            (self.run_dir / RUN_ID_FILE).write_text(run_id)

    def _load(self, path: Path) -> None:
        state = ckpt.load_training_state(path)
        ckpt.check_resumable(path, state, self.cfg.flat(), self.model_without_ddp.state_dict(),
                             [g.tolist() for g in self.groupings] if self.groupings is not None else None)
        self.model_without_ddp.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.method_training.load_state_dict(state["training"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.meter = engine.EpochMeter.resumed(state["meter"], carries_sums=self.info.is_main)
        self.best_top1, self.history = state["best_top1"], state["history"]
        self.run_id = state.get("mlflow_run_id")
        ckpt.set_rng_state(state["rng"])
        if not self.info.is_main:
            return
        if self.epoch >= self.cfg.schedule.epochs:
            print(f"{path}: the run already finished its {self.cfg.schedule.epochs} epochs; evaluating it again "
                  f"(raise schedule.epochs to train further)", flush=True)
        else:
            print(f"resumed from {path}: epoch {self.epoch + 1} step {self.step_in_epoch}", flush=True)

    # -- the loop

    def fit(self) -> dict[str, float]:
        cfg, info = self.cfg, self.info
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config_lib.save_config(cfg, self.run_dir / "config.yaml")
        self.run_id = self.tracker.start(run_name=cfg.run_name, params=cfg.flat(),
                                         tags=run_tags(cfg, info, self.groupings), run_id=self.run_id)
        if info.is_main:
            for path in ckpt.remove_stale_temporaries(self.run_dir):
                print(f"removed {path.name}, left by a save that was interrupted", flush=True)
            self._note_run_id()
            self._log_static_artifacts()
            restarts.log_restarts(self.run_dir, self.tracker, self.journal)
            if self.resume_path is None:  # once per run: a resumed run has them already
                import ssal_models
                counts = ssal_models.count_parameters(self.model_without_ddp)
                self.journal.log("model/params", {f"model/params/{n}": float(v) for n, v in counts.items()}, step=0)
            elif self.epoch > 0:  # the checkpoint's epoch: its log may have been cut off after the save
                self.journal.log(f"epoch {self.epoch}", self._history_at(self.epoch), step=self.epoch)
            print(f"run dir {self.run_dir}; world size {info.world_size}; device {info.device}; "
                  f"{self.steps_per_epoch} steps/epoch of {self.global_batch} images; peak lr {self.peak_lr:.4g}; "
                  f"data order {self.train_loader.order}, os_cache {str(cfg.data.os_cache).lower()}"
                  + (f"; MLflow {self.tracker.run_url}" if self.run_id else ""), flush=True)
        epochs = cfg.schedule.epochs
        last_metrics: dict[str, float] = {}
        self.watchdog.start(self.global_step)  # stopped by the entry, however the run ends
        if self.resume_path is None:  # once per run, before any training
            self._log_initial_metrics()
        while self.epoch < epochs:
            epoch = self.epoch
            resolution = self.resolution_for_epoch(epoch, min_res=cfg.data.min_res, max_res=cfg.data.max_res,
                                                   start_ramp=cfg.data.start_ramp, end_ramp=cfg.data.end_ramp)
            self.train_loader.set_resolution(resolution)
            self.train_loader.set_epoch(epoch)
            progress = engine.Progress(info.is_main, epoch, epochs, self.steps_per_epoch, self.step_in_epoch,
                                       self.global_batch, cfg.train.log_every)
            start_step = self.step_in_epoch
            self.watchdog.epoch_begin()

            def after_step():  # the trainer's counters stay exact even when the epoch ends by Preempted
                self.step_in_epoch += 1
                self.global_step += 1
                self.trained = True
                self.bn_averaged = False
                if cfg.train.deterministic:
                    self.average_bn_statistics()
                if self.ema is not None:
                    self.ema.update_parameters(self.model_without_ddp)
                self.watchdog.step_done(self.global_step)

            def checkpoint_due():  # just before every flag agreement, on every rank
                self.watchdog.sync()
                return self.checkpoint_clock.due()

            try:
                engine.train_one_epoch(
                    self.method_training, self.train_loader, epoch=epoch, steps=self.steps_per_epoch,
                    start_step=start_step, meter=self.meter, global_step=self.global_step,
                    stop_requested=preemption.requested,
                    lr_factor_at=lambda iteration: lr_factor(cfg.schedule, iteration, self.steps_per_epoch),
                    on_step_end=after_step, progress=progress, sync_every=cfg.train.sync_every,
                    checkpoint_due=checkpoint_due, on_step_begin=self.watchdog.step_begin,
                    save_checkpoint=lambda seconds: save_mid_epoch(self, seconds, self.tracker.log_metrics))
            finally:
                progress.close()
            self.watchdog.idle()
            metrics = self.meter.reduced(info.device)
            metrics["train/resolution"] = float(resolution)
            metrics["train/lr"] = self.method_training.lr
            metrics.update(self.method_training.epoch_metrics())
            metrics.update(peak_gpu_memory(info.device, "train"))
            last_epoch = epoch + 1 == epochs
            confusion = None
            if (epoch + 1) % cfg.eval.every_n_epochs == 0 or last_epoch:
                val, confusion = self.evaluate()
                metrics.update(val)
                metrics.update(peak_gpu_memory(info.device, "val"))
            self.epoch, self.step_in_epoch, self.meter = epoch + 1, 0, engine.EpochMeter()
            for name, value in metrics.items():
                self.history.setdefault(name, []).append((epoch + 1, value))
            if info.is_main:
                heads = "  ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in sorted(metrics.items())
                                  if k.startswith("val/top1/") or k == "train/loss")
                print(f"epoch {epoch + 1}/{epochs}  {heads}  {metrics['train/images_per_second']:.0f} img/s", flush=True)
            top1 = metrics.get("val/top1/main")
            names = []
            if top1 is not None and top1 > self.best_top1:
                self.best_top1 = top1
                if cfg.checkpoint.keep_best:
                    names.append(ckpt.BEST)
            if (epoch + 1) % cfg.checkpoint.every_n_epochs == 0 or last_epoch:
                names.append(ckpt.LAST)
            # best.pt first and last.pt a link to it: a kill between the two leaves the previous last.pt, whose
            # resume redoes this epoch and saves its best again (last.pt first could leave a stale best.pt)
            if names:
                self.save(*names)
            # logged once the checkpoint is on disk: a kill or a full disk during the save makes
            # the resume redo this epoch, which is then logged for the first time
            self.journal.log(f"epoch {epoch + 1}", metrics, step=epoch + 1)
            if confusion is not None:
                last_metrics = metrics
                self.confusion = confusion
        if not last_metrics:  # resumed after the end: evaluate what there is
            last_metrics, self.confusion = self.evaluate()
        self.holdout_confusion = None
        if self.holdout_loader is not None:
            self.average_bn_statistics()
            self.holdout_soft_confusion = torch.zeros(self.num_classes, self.num_classes)
            holdout, self.holdout_confusion = engine.evaluate(
                self.model_without_ddp, self.holdout_loader, device=self.info.device, amp=self.amp,
                num_classes=self.num_classes, topk=self.cfg.eval.topk, channels_last=self.channels_last,
                prefix="holdout", soft_out=self.holdout_soft_confusion)
            self.journal.log(f"holdout {epochs}", holdout, step=epochs)
            last_metrics.update(holdout)
        if info.is_main:
            self._log_final_artifacts()
        return last_metrics

    def _history_at(self, epoch: int) -> dict[str, float]:
        """The metrics of `epoch` as the checkpoint's history holds them."""
        return {name: value for name, points in self.history.items() for at, value in points if at == epoch}

    def log_wall_seconds(self, seconds: float) -> None:
        """Once per run, and only by a process that trained (not by a re-evaluation)."""
        if self.trained:
            self.journal.log(f"wall_seconds {self.cfg.schedule.epochs}", {"run/wall_seconds": seconds},
                             step=self.cfg.schedule.epochs)

    def _log_initial_metrics(self) -> None:
        """The method's reference metrics before training (MAXL: the untrained generator's labels
        on epoch 0's batches), logged at step 0."""
        cfg = self.cfg
        self.train_loader.set_resolution(self.resolution_for_epoch(
            0, min_res=cfg.data.min_res, max_res=cfg.data.max_res, start_ramp=cfg.data.start_ramp,
            end_ramp=cfg.data.end_ramp))
        self.train_loader.set_epoch(0)
        metrics = self.method_training.initial_metrics(self.train_loader, self.steps_per_epoch)
        if metrics:
            for name, value in metrics.items():
                self.history.setdefault(name, []).append((0, value))
            self.journal.log("initial", metrics, step=0)

    def evaluate(self) -> tuple[dict[str, float], torch.Tensor]:
        self.average_bn_statistics()
        kwargs = dict(device=self.info.device, amp=self.amp, num_classes=self.num_classes,
                      topk=self.cfg.eval.topk, tta_flip=self.cfg.eval.tta_flip, channels_last=self.channels_last)
        self.soft_confusion = torch.zeros(self.num_classes, self.num_classes)  # of the last val evaluation
        metrics, confusion = engine.evaluate(self.model_without_ddp, self.val_loader, soft_out=self.soft_confusion,
                                             **kwargs)
        if self.ema is not None:
            ema_metrics, _ = engine.evaluate(self.ema.module, self.val_loader, prefix="val_ema", **kwargs)
            metrics.update(ema_metrics)
        return metrics, confusion

    def _log_static_artifacts(self) -> None:
        self.tracker.log_artifact(str(self.run_dir / "config.yaml"))
        if self.groupings is not None:
            from ssal_models import grouping
            path = self.run_dir / "groupings.json"
            grouping.save_groupings(path, self.groupings, self.class_names)
            self.tracker.log_artifact(str(path))

    def _log_final_artifacts(self) -> None:
        from pipeline.tracking import plots

        conf_path = self.run_dir / "confusion_main.npy"
        np.save(conf_path, self.confusion.numpy())
        self.tracker.log_artifact(str(conf_path))
        np.save(self.run_dir / "confusion_soft_main.npy", self.soft_confusion.numpy())
        self.tracker.log_artifact(str(self.run_dir / "confusion_soft_main.npy"))
        if self.holdout_confusion is not None:
            for name, matrix in (("confusion_holdout.npy", self.holdout_confusion),
                                 ("confusion_soft_holdout.npy", self.holdout_soft_confusion)):
                np.save(self.run_dir / name, matrix.numpy())
                self.tracker.log_artifact(str(self.run_dir / name))
        self.tracker.log_figure(plots.confusion_heatmap(self.confusion.numpy(), self.class_names),
                                "confusion_main.png")
        curves = {k: v for k, v in self.history.items() if k.startswith("val/top1/") or k.startswith("val_ema/top1/")}
        if curves:
            self.tracker.log_figure(plots.accuracy_curves(curves), "accuracy_curves.png")
        for path in self.method_training.final_artifacts(self.run_dir):
            self.tracker.log_artifact(str(path))
        weights = self.run_dir / "final_weights.pt"
        ckpt.atomic_torch_save(self.model_without_ddp.state_dict(), weights)
        if self.cfg.tracking.log_model and self.cfg.tracking.enabled:
            self.tracker.log_artifact(str(weights))  # the stage tools' input where the run folder is not at hand
            self._log_mlflow_model()

    def _log_mlflow_model(self) -> None:
        """The final model as the run's MLflow model ``runs:/<id>/model`` (``model_export``)."""
        from pipeline.train.model_export import MODEL_NAME, save_mlflow_model

        try:
            path = save_mlflow_model(engine.unwrap(self.model_without_ddp), self.run_dir,
                                     resolution=self.cfg.data.val_res, method=self.cfg.method.name,
                                     class_names=self.class_names)
        except Exception as err:  # noqa: BLE001 - the run is trained and its weights saved: never fail it here
            print(f"warning: the MLflow model was not saved ({type(err).__name__}: {err}); "
                  f"final_weights.pt has the weights", file=sys.stderr, flush=True)
            return
        self.tracker.log_model(str(path), MODEL_NAME)


def peak_gpu_memory(device: torch.device, prefix: str) -> dict[str, float]:
    """``{prefix}/peak_gpu_memory_gib`` since the last call (this rank's; the counter is reset), or nothing
    off CUDA. Called after training and after evaluation: each phase's own peak, every epoch."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return {f"{prefix}/peak_gpu_memory_gib": peak}
