"""+LC stage: fit SSAL's linear-combination head on a frozen, trained SSAL model.

    python pipeline/fit_lc.py --run RUN_ID [--epochs 10] [--lr 1e-3] [--max-samples N]
    python pipeline/fit_lc.py --run-dir runs/studies/demo/ssal3 --out runs/studies/demo/lc

The model (config.yaml + final_weights.pt of the run, from its folder or its MLflow artifacts)
is frozen; its outputs on the *train* split it was trained on (center crop, no augmentation, the
held-out share excluded; a seeded subset with ``--max-samples``) are collected once, and
``ssal_models.fit_linear_combination`` fits the +LC head on them (Adam, starting from the +JP
rule, METHODS.md §1). Then the whole val split is evaluated with the head attached: every
prediction rule (``main``, ``joint``, ``lc``) is logged under the engine's metric names
(``val/top1/lc`` ...) in a new MLflow run (tags ``method=ssal+lc``, ``source_run``, and
``study`` / ``stage`` from ``--tag``); the head is saved as ``lc_head.pt`` in ``--out`` and logged.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipeline.stages.common import (DOCS_EPILOG, ToolError, add_tracking_options, kept_output_dir, load_trained,
                                    log_stage_run, parse_tags, resolve_run, run_cli, run_dataset, scratch_dir,
                                    source_experiment, source_tags, store_uri)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python pipeline/fit_lc.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fit the +LC head of a trained SSAL run (rest frozen) and log +LC accuracy to MLflow.",
        epilog=__doc__.split("\n\n", 2)[2] + DOCS_EPILOG)
    src = parser.add_argument_group("trained SSAL run (exactly one)")
    src.add_argument("--run", metavar="RUN_ID", help="MLflow run id of a finished SSAL training run")
    src.add_argument("--run-dir", metavar="DIR", help="its run folder (config.yaml, final_weights.pt)")
    parser.add_argument("--epochs", type=int, default=10,
                        help="passes over the collected outputs (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass and per LC step "
                                                                    "(default: %(default)s)")
    parser.add_argument("--max-samples", type=int, default=0, help="fit on a seeded subset of this many train images "
                                                                    "(0 = all; default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", help="folder for lc_head.pt and the tracking journal (default: <run dir>/lc; a new "
                                      "lc-* folder in the temp dir, kept, when the run folder is not here)")
    add_tracking_options(parser, "the +LC run", "the source run's experiment", run_name_help="<source run name>+lc")
    return parser


def collect_outputs(model, loader, device):
    import torch

    outputs, labels = {}, []
    with torch.no_grad():
        for images, targets in loader:
            out = model(images.to(device))
            for name, value in out.items():
                outputs.setdefault(name, []).append(value.float().cpu())
            labels.append(targets.cpu())
    return {k: torch.cat(v) for k, v in outputs.items()}, torch.cat(labels)


def run(args) -> dict:
    import numpy as np
    import torch

    from pipeline.train import engine

    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise ToolError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise ToolError(f"--lr: must be > 0, got {args.lr}")
    client, src, folder = resolve_run(args.run, args.run_dir, args.tracking_uri, args.runs_root)
    with scratch_dir("fit-lc") as tmp:
        cfg, model, names, groupings = load_trained(client, src, folder, tmp)
    if model.method.name != "ssal":
        raise ToolError(f"the run's method is {model.method.name!r}: +LC needs an SSAL run (method.name=ssal)")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ToolError("--device cuda: no GPU here; use --device cpu")
    model.to(device).requires_grad_(False)

    from ssal_datasets import loader as data_loader
    from pipeline.train.factory import Relabelled, holdout_split, label_space

    root, manifest = run_dataset(cfg, "run this where data.root is")
    n_train = int(manifest["splits"]["train"]["count"])
    train_idx, _ = holdout_split(n_train, cfg.eval.holdout_fraction, cfg.train.seed)
    train_idx = np.arange(n_train) if train_idx is None else train_idx
    if args.max_samples and args.max_samples < train_idx.size:
        train_idx = np.sort(np.random.default_rng(args.seed).choice(train_idx, args.max_samples, replace=False))
    common = dict(batch_size=args.batch_size, num_workers=max(1, cfg.data.num_workers), resolution=cfg.data.val_res,
                  device=device, distributed=False, channels_last=False, preprocess=cfg.data.val_preprocess)
    _, _, label_table = label_space(cfg, manifest)  # data.labels=superclass: the run's labels

    def loader(split: str, **kw):
        made = data_loader.create_val_loader(root / manifest["splits"][split]["beton"], **kw, **common)
        return made if label_table is None else Relabelled(made, label_table)

    started = time.perf_counter()
    fit_loader = loader("train", indices=train_idx)
    outputs, targets = collect_outputs(model, fit_loader, device)
    fit_loader.close()
    method = model.method
    torch.manual_seed(args.seed)
    head = torch_fit(method, outputs, targets, args)
    method.set_linear_combination(head.to(device))
    with torch.no_grad():
        feats = method.lc_features({k: v.to(device) for k, v in outputs.items()})
        train_lc = (head(feats).argmax(1).cpu() == targets).float().mean().item()
    val_loader = loader("val")
    metrics, _ = engine.evaluate(model, val_loader, device=device, amp="none", num_classes=len(names),
                                 topk=cfg.eval.topk, tta_flip=cfg.eval.tta_flip)
    val_loader.close()
    seconds = time.perf_counter() - started
    metrics["lc/train_top1"] = train_lc
    metrics["lc/train_samples"] = float(targets.numel())
    metrics["run/wall_seconds"] = seconds
    import ssal_models

    metrics["model/params"] = float(ssal_models.count_parameters(model)["total"])

    out = Path(args.out) if args.out else (folder / "lc" if folder is not None else kept_output_dir("lc"))
    out.mkdir(parents=True, exist_ok=True)
    head_path = out / "lc_head.pt"
    torch.save({"state_dict": head.state_dict(), "num_classes": head.num_classes, "num_groups": head.num_groups,
                "source_run": src.info.run_id if src is not None else None}, head_path)
    shown = {k: round(v, 4) for k, v in sorted(metrics.items()) if k.startswith("val/top1/")}
    print(f"+LC fitted on {targets.numel()} train images ({args.epochs} epochs, lr {args.lr}) in {seconds:.0f} s; "
          f"train top-1 {train_lc:.4f}; val {json.dumps(shown)}; head: {head_path}")
    result = {"metrics": metrics, "head": str(head_path), "run_id": None}
    if not args.no_mlflow:
        uri = store_uri(args.tracking_uri, args.runs_root)
        experiment = args.experiment or source_experiment(client, src, "lc")
        inherited = ("arch", "dataset", "study", "groups", "branches")
        tags = {"method": "ssal+lc", "stage": "lc", **source_tags(src, inherited), **parse_tags(args.tag)}
        name = args.run_name or f"{src.info.run_name if src is not None else 'ssal'}+lc"
        params = {"lc.epochs": args.epochs, "lc.lr": args.lr, "lc.batch_size": args.batch_size,
                  "lc.max_samples": args.max_samples, "lc.seed": args.seed, "model.arch": cfg.model.arch,
                  "method.name": "ssal", "data.dataset": cfg.data.dataset}
        result["run_id"] = log_stage_run(uri, experiment, out, name, params=params, tags=tags, metrics=metrics,
                                         step=cfg.schedule.epochs, artifacts=[head_path])
    return result


def torch_fit(method, outputs, targets, args):
    from ssal_models import fit_linear_combination

    return fit_linear_combination(method, outputs, targets, epochs=args.epochs, batch_size=args.batch_size,
                                  lr=args.lr, seed=args.seed)


def main(argv=None) -> int:
    return run_cli(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
