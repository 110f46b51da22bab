"""The recipe card that ``launch.py --dry-run`` prints: what a run would be and cost, computed from its config.

- global batch: ``data.batch_size`` (per rank) x the ranks;
- peak lr: ``optim.lr`` (per 256 images) scaled by the global batch, as the trainer scales it (``optim.scaled_lr``);
- steps per epoch: the train images (the count in ``data.root``'s manifest, else the dataset's known count; less
  the held-out fraction) // the global batch (the train loader drops the last partial batch), capped by
  ``train.max_steps_per_epoch``;
- estimated A100 GPU-hours: epochs x train images / images per second, where images per second is FFCV's published
  end-to-end ResNet-50 figure on an A100 (about 3000 img/s on its 160->192 px schedule, taken at 176 px) scaled by
  the forward multiply-adds of the model at the mean training resolution (torch's FlopCounterMode on the meta
  device, branches included): the rule of the README's table of GPU-hours. It assumes every model is compute-bound
  at ResNet-50's efficiency, and counts no evaluation; MAXL's meta steps are not counted either.

It imports ``pipeline.train`` (config, factory, optim) and ``ssal_datasets.manifest``; torch only to count.
"""
from __future__ import annotations

import dataclasses

from pipeline.train.config import Config, resolve_path
from pipeline.train.optim import scaled_lr

#: train images and classes of the datasets a manifest may not be at hand for (ImageNet-1k's train split; TinyImageNet)
KNOWN_DATASETS = {"imagenet": (1_281_167, 1000), "tinyimagenet": (100_000, 200)}
#: FFCV's ResNet-50 throughput per A100 (rn50 configs: blurpool, 160->192 px, taken at 176 px): the cost reference
REFERENCE_IMAGES_PER_SECOND = 3000.0
REFERENCE_ARCH, REFERENCE_RESOLUTION = "resnet50", 176


def dataset_size(cfg: Config) -> tuple[int | None, int | None, str]:
    """(train images, classes, where they come from): data.root's manifest, else the known counts."""
    from ssal_datasets.manifest import read_manifest

    try:
        manifest = read_manifest(resolve_path(cfg.data.root))
        return int(manifest["splits"]["train"]["count"]), int(manifest["num_classes"]), f"manifest in {cfg.data.root}"
    except Exception:  # noqa: BLE001 - no data here yet: the dataset's known size
        if cfg.data.dataset in KNOWN_DATASETS:
            images, classes = KNOWN_DATASETS[cfg.data.dataset]
            return images, classes, f"{cfg.data.dataset}'s known count (no manifest in {cfg.data.root})"
        if cfg.data.dataset == "demo":
            from ssal_datasets.demo import DemoSpec

            spec = DemoSpec()
            return spec.num_classes * spec.train_per_class, spec.num_classes, "the demo set's default size"
        return None, None, f"unknown (no manifest in {cfg.data.root})"


def forward_macs(cfg: Config, num_classes: int, resolution: int) -> float:
    """Multiply-adds of one image's forward pass through the model the config builds (meta device: no compute).
    Without its groups file (computed later from a baseline run) SSAL's heads get random groupings of the
    config's sizes: a head's cost hardly depends on its number of groups."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.train.config import GROUPED_METHODS, ConfigError
    from pipeline.train.factory import build_model, load_groupings

    groupings = None
    if cfg.method.name in GROUPED_METHODS:
        try:
            groupings = load_groupings(cfg, num_classes)
        except (OSError, ConfigError):
            groupings = load_groupings(dataclasses.replace(cfg, method=dataclasses.replace(
                cfg.method, groups_file="", num_groups=[k for k in cfg.method.num_groups if k <= num_classes // 2])),
                num_classes)
    with torch.device("meta"):
        model = build_model(cfg, num_classes, groupings)
        images = torch.empty(1, 3, resolution, resolution)
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    return counter.get_total_flops() / 2


def recipe_card(cfg: Config, nodes: int, ranks_per_node: int, source: str) -> dict:
    """The card's values (see the module's docstring)."""
    ranks = nodes * ranks_per_node
    global_batch = cfg.data.batch_size * ranks
    images, classes, counted_from = dataset_size(cfg)
    card = {"recipe": source, "nodes": nodes, "ranks_per_node": ranks_per_node, "ranks": ranks,
            "batch_per_rank": cfg.data.batch_size, "global_batch": global_batch, "lr_per_256": cfg.optim.lr,
            "peak_lr": scaled_lr(cfg.optim, global_batch), "schedule": cfg.schedule.kind, "epochs": cfg.schedule.epochs,
            "train_images": images, "counted_from": counted_from, "steps_per_epoch": None, "gpu_hours": None}
    if images is None:
        return card
    images -= int(round(images * cfg.eval.holdout_fraction)) if cfg.eval.holdout_fraction > 0 else 0
    steps = images // global_batch
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    resolution = round((cfg.data.min_res + cfg.data.max_res) / 2)
    macs = forward_macs(cfg, classes, resolution)
    reference = forward_macs(_reference_config(), 1000, REFERENCE_RESOLUTION)
    images_per_second = REFERENCE_IMAGES_PER_SECOND * reference / macs
    trained = cfg.schedule.epochs * steps * global_batch
    card.update(steps_per_epoch=steps, trained_images=trained, resolution=resolution, gmac=macs / 1e9,
                reference_gmac=reference / 1e9, images_per_second=images_per_second,
                gpu_hours=trained / images_per_second / 3600)
    return card


def _reference_config() -> Config:
    from pipeline.train.config import config_from_dict

    return config_from_dict({"data": {"dataset": "imagenet"}, "model": {"arch": REFERENCE_ARCH, "blurpool": True},
                             "method": {"name": "baseline"}})


def format_card(card: dict) -> str:
    lines = [f"# recipe card: {card['recipe']}",
             f"#   ranks:           {card['ranks']} ({card['nodes']} node(s) x {card['ranks_per_node']})",
             f"#   global batch:    {card['global_batch']} ({card['batch_per_rank']} per rank x {card['ranks']})",
             f"#   peak lr:         {card['peak_lr']:.6g} (optim.lr {card['lr_per_256']:g} per 256 images x "
             f"{card['global_batch']}/256; {card['schedule']} schedule)",
             f"#   epochs:          {card['epochs']}"]
    if card["steps_per_epoch"] is None:
        lines.append(f"#   steps per epoch: unknown: train images {card['counted_from']}")
        return "\n".join(lines)
    lines += [f"#   steps per epoch: {card['steps_per_epoch']} ({card['train_images']} train images, "
              f"{card['counted_from']})",
              f"#   GPU-hours:       {card['gpu_hours']:.1f} on A100s, estimated: {card['epochs']} epochs x "
              f"{card['steps_per_epoch'] * card['global_batch']} images / {card['images_per_second']:.0f} img/s "
              f"(wall time on {card['ranks']} GPU(s): {card['gpu_hours'] / card['ranks']:.2f} h)",
              f"#   img/s per A100:  {card['images_per_second']:.0f} = FFCV's ResNet-50 {REFERENCE_IMAGES_PER_SECOND:.0f} "
              f"img/s ({card['reference_gmac']:.2f} GMAC at {REFERENCE_RESOLUTION} px) x {card['reference_gmac']:.2f} / "
              f"{card['gmac']:.2f} GMAC (this model's forward at {card['resolution']} px, the mean training resolution)"]
    return "\n".join(lines)
