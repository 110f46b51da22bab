"""Training throughput of the real loop: the Trainer's epochs (engine.train_one_epoch with the FFCV
loader, DDP, the per-step flags and BN averaging as the recipe configures them), side by side.

    python bench/train_throughput.py          # GPU: ResNet-50 baseline / SSAL x3 / DKS x2 at batch 64 and the recipe's
    python bench/train_throughput.py --device cpu --recipes configs/demo.yaml --batches 8 --res 32 \\
        --classes 4 --images 96 --warmup 1 --steps 2 --set model.width_multiplier=0.125   # CPU smoke run

Each case (recipe x per-GPU batch) is one real run in this process: ``Trainer(cfg).setup()`` on a
one-rank process group (NCCL on a GPU, gloo on CPU) that the trainer treats as distributed, so the
model is wrapped in DDP and every collective of a multi-GPU run is issued; then ``Trainer.fit()`` for
3 epochs of ``--warmup + --steps`` steps at ``--res`` px: epoch 1 warms up (cuDNN autotuning, the
loader's threads), epoch 2 is fed by the FFCV train loader, epoch 3 by its first batch again and
again, already on the device ("synthetic": the model's ceiling). In epochs 2 and 3 the steps after
the first ``--warmup`` are timed (device-synchronised at both ends) and, on CUDA, the host-device
synchronisations counted (``torch.cuda.set_sync_debug_mode("warn")``, over the loop and the loader).

Reported per case: FFCV-fed and synthetic img/s, P3 = fed / synthetic (target >= 0.95), syncs per
step; overall P4 = ResNet-50 baseline fed img/s at the recipe's batch (target >= 5000 on an
H100/H200 at 176 px; FFCV's published ResNet-50 run is ~3000 img/s per A100 end to end). The data:
realistic-size JPEGs (300-500 px) written to a temporary beton unless ``--data`` names a data set
folder. ``--json FILE`` is rewritten after every case (bench/gpu_check.sh --part 1).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.train import dist as dist_util
from pipeline.train.config import GROUPED_METHODS, REPO_ROOT, load_config, resolve_path
from pipeline.train.entry import configure_torch
from pipeline.train.trainer import Trainer
from ssal_datasets.manifest import read_manifest

RECIPES = tuple(f"configs/imagenet/resnet50_{name}.yaml" for name in ("baseline", "ssal3", "dks2"))
SYNC_WARNING = "synchronizing"  # in torch's set_sync_debug_mode("warn") message


class OneRankGroup(dist_util.DistInfo):
    """Rank 0 of a one-process group, treated as distributed: DDP and every collective as on N GPUs."""

    @property
    def distributed(self) -> bool:
        return True


def one_rank_group(device: torch.device) -> OneRankGroup:
    """Initialise a one-rank process group on ``device`` (NCCL on CUDA, gloo on CPU)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    return OneRankGroup(rank=0, world_size=1, local_rank=0, device=device, backend=backend)


class TimedFeed:
    """The trainer's train loader with a stopwatch. Epoch 0: the loader (warm-up); epoch 1: the
    loader, timed; epoch 2: epoch 1's first batch over and over, on the device (synthetic), timed.
    Timed = the steps after the first ``warmup`` of the epoch, ``steps`` of them."""

    def __init__(self, loader, warmup: int, steps: int, device: torch.device):
        self.loader, self.warmup, self.steps, self.device = loader, warmup, steps, device
        self.epoch = 0
        self.first = None
        self.timings: dict[str, dict] = {}

    def __getattr__(self, name):  # order, set_resolution, close ... of the real loader
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def _source(self):
        if self.epoch < 2:
            return iter(self.loader)
        return itertools.repeat(self.first)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __iter__(self):
        feed = {1: "ffcv", 2: "synthetic"}.get(self.epoch)
        source = self._source()
        started, complete = None, False
        caught = warnings.catch_warnings(record=True)
        try:
            for index in itertools.count():
                if feed and index == self.warmup:
                    self._sync()
                    if self.device.type == "cuda":
                        seen = caught.__enter__()
                        warnings.simplefilter("always")
                        torch.cuda.set_sync_debug_mode("warn")
                    started = time.perf_counter()
                if feed and index == self.warmup + self.steps:
                    complete = True
                    break
                batch = next(source, None)
                if batch is None and not feed:
                    return
                if batch is None:
                    raise ValueError(f"the train split has {len(self.loader)} batches, fewer than the "
                                     f"{self.warmup + self.steps} warm-up + timed steps; write more images")
                if self.epoch == 1 and index == 0:
                    self.first = tuple(t.clone() for t in batch)
                yield batch
        finally:
            if started is not None:
                if self.device.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
                self._sync()
                seconds = time.perf_counter() - started
                syncs = None
                if self.device.type == "cuda":
                    caught.__exit__(None, None, None)
                    syncs = sum(SYNC_WARNING in str(w.message) for w in seen)
                if complete:  # not an epoch that ended early (an error, a stop)
                    batch = self.first[1].shape[0]
                    self.timings[feed] = {"img_s": self.steps * batch / seconds, "seconds": seconds,
                                          "syncs_per_step": None if syncs is None else syncs / self.steps}
            close = getattr(source, "close", None)
            if close is not None:
                close()


def recipe_file(recipe: str | Path) -> Path:
    """A recipe named from the working directory, else from the repository's root (the defaults)."""
    return Path(recipe) if Path(recipe).is_file() else resolve_path(recipe)


def recipe_config(recipe: str | Path):
    """The recipe as written, but for its groups file (computed from a real baseline run: not here)."""
    return load_config(recipe_file(recipe), ["method.groups_file="])


def real_loop(recipe: str | Path, data_root: Path, work: Path, *, info: dist_util.DistInfo, batch: int | None,
              res: int, warmup: int, steps: int, workers: int, overrides=()) -> dict:
    """One case: the recipe's run (per-GPU batch ``batch``, None = the recipe's) for 3 short epochs
    through ``Trainer.fit`` (see the module doc); its figures."""
    manifest = read_manifest(data_root)
    settings = {"data.root": str(data_root), "data.dataset": manifest["dataset"], "data.num_workers": workers,
                "data.min_res": res, "data.max_res": res, "data.val_res": res, "schedule.epochs": 3,
                "train.max_steps_per_epoch": warmup + steps, "train.log_every": 10**6, "eval.every_n_epochs": 3,
                "checkpoint.every_n_epochs": 3, "checkpoint.keep_best": "false", "tracking.enabled": "false",
                "runs_root": str(work / "runs"), "output_dir": str(work / "run"), "method.groups_file": ""}
    if batch is not None:
        settings["data.batch_size"] = batch
    if recipe_config(recipe).method.name in GROUPED_METHODS:  # SSAL's 200/334/500 of 1000 classes, to scale
        settings["method.num_groups"] = "[" + ",".join(str(max(2, manifest["num_classes"] // d)) for d in (5, 3, 2)) + "]"
    cfg = load_config(recipe_file(recipe), [f"{k}={v}" for k, v in settings.items()] + list(overrides))
    configure_torch(cfg)
    trainer = Trainer(cfg, info, resume="")
    trainer.setup()
    feed = TimedFeed(trainer.train_loader, warmup, steps, info.device)
    trainer.train_loader = feed
    trainer.fit()
    fed, synthetic = feed.timings["ffcv"], feed.timings["synthetic"]
    row = {"recipe": str(recipe), "method": cfg.method.name, "arch": cfg.model.arch, "batch": cfg.data.batch_size,
           "resolution": res, "amp": trainer.amp, "channels_last": trainer.channels_last,
           "ddp": isinstance(trainer.method_training.train_model, torch.nn.parallel.DistributedDataParallel),
           "steps_trained": trainer.global_step, "ffcv_fed_img_s": fed["img_s"], "synthetic_img_s": synthetic["img_s"],
           "p3_fed_over_synthetic": fed["img_s"] / synthetic["img_s"],
           "syncs_per_step_fed": fed["syncs_per_step"], "syncs_per_step_synthetic": synthetic["syncs_per_step"]}
    trainer.train_loader.loader.close()
    del trainer, feed
    gc.collect()
    if info.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _bench_class(src: Path, index: int, per_class: int) -> None:
    """The JPEGs of one class of the bench tree (one process per class: minutes serially at 5000)."""
    from ssal_datasets.synth import make_bench_tree

    part = src / f"part{index}"
    make_bench_tree(part, num_classes=1, per_class=per_class, size_range=(300, 500), seed=100 + index)
    (part / "class000").rename(src / "train" / f"class{index:03d}")
    part.rmdir()


def write_bench_data(workdir: Path, images: int, classes: int) -> Path:
    """An ImageNet-layout data set folder (betons + manifest) of realistic-size JPEGs."""
    from ssal_datasets.synth import make_bench_tree

    src = workdir / "src"
    (src / "train").mkdir(parents=True)
    with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_bench_class, [src] * classes, range(classes), [-(-images // classes)] * classes))
    make_bench_tree(src / "val", num_classes=classes, per_class=1, size_range=(300, 500), seed=1)
    out = workdir / "data"
    subprocess.run([sys.executable, str(REPO_ROOT / "datasets" / "write_ffcv.py"), "imagenet", "--root", str(src),
                    "--out", str(out), "--max-resolution", "500", "--write-mode", "jpg"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def summary(rows: list[dict], device_name: str) -> dict:
    """The JSON of bench/gpu_check.sh: every case, and P3 / P4 of the baseline at the recipe's batch."""
    figures = {"device": device_name, "rows": rows}
    reference = [r for r in rows if r["method"] == "baseline"]
    if reference:
        top = max(reference, key=lambda r: r["batch"])
        figures.update(p3_fed_over_synthetic=top["p3_fed_over_synthetic"], p4_img_s=top["ffcv_fed_img_s"],
                       p4_batch=top["batch"])
    syncs = [r[k] for r in rows for k in ("syncs_per_step_fed", "syncs_per_step_synthetic") if r[k] is not None]
    figures["max_syncs_per_step"] = max(syncs) if syncs else None
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help="config files, one case each")
    parser.add_argument("--batches", nargs="+", default=["64", "recipe"],
                        help="per-GPU batches ('recipe' = the recipe's data.batch_size)")
    parser.add_argument("--res", type=int, default=176, help="train crop size (FFCV recipe: 160-192)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each epoch")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per epoch")
    parser.add_argument("--classes", type=int, default=100, help="classes of the generated data set")
    parser.add_argument("--images", type=int, default=0,
                        help="train images to generate (default: enough for the largest batch's steps)")
    parser.add_argument("--workers", type=int, default=max(1, len(os.sched_getaffinity(0)) - 2))
    parser.add_argument("--data", help="a data set folder (betons + manifest.json) instead of generated JPEGs")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every case")
    parser.add_argument("--json", help="write the figures here too, after every case")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("train_throughput: --device cuda but CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
        device = torch.device("cuda", torch.cuda.current_device())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    cases = [(recipe, None if b == "recipe" else int(b)) for recipe in args.recipes for b in args.batches]
    largest = max(b if b is not None else recipe_config(r).data.batch_size for r, b in cases)
    info = one_rank_group(device)
    rows: list[dict] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(args.data) if args.data else write_bench_data(
                Path(tmp), args.images or largest * (args.warmup + args.steps + 1), args.classes)
            for index, (recipe, batch) in enumerate(cases):
                row = real_loop(recipe, data, Path(tmp) / f"case{index}", info=info, batch=batch, res=args.res,
                                warmup=args.warmup, steps=args.steps, workers=args.workers, overrides=args.set)
                rows.append(row)
                syncs = row["syncs_per_step_fed"]
                print(f"{row['method']:9s} batch {row['batch']:4d}: FFCV-fed {row['ffcv_fed_img_s']:8.0f} img/s, "
                      f"synthetic {row['synthetic_img_s']:8.0f} img/s, P3 {row['p3_fed_over_synthetic']:.3f}, "
                      f"syncs/step {'n/a' if syncs is None else f'{syncs:.2f}'}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(summary(rows, device_name), indent=1) + "\n")
    finally:
        dist_util.cleanup()
    figures = summary(rows, device_name)
    if "p4_img_s" in figures:
        print(f"P3 {figures['p3_fed_over_synthetic']:.3f}, P4 {figures['p4_img_s']:.0f} img/s "
              f"(baseline, batch {figures['p4_batch']}, {device_name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
