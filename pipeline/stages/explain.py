"""Class activation maps of the main head and of every SSAL branch (SSAL paper Fig. 6).

    python pipeline/explain.py --run RUN_ID --images a.jpg b.png [--out cams.png]
    python pipeline/explain.py --run-dir runs/studies/demo/ssal3 --num-images 4

For each image: the image, then one panel per head -- the main head's CAM for its predicted class,
and each SSAL branch's CAM for its predicted *group*, with the class names of that group printed
under the panel (the paper lists them beside each map). A CAM is exact for a head that ends in
global average pooling + a linear layer: ``relu(Σ_c w[pred, c] · A_c)`` over the head's last
feature map ``A`` (backbone ``layer4`` for the main head; the branch's Inception block for SSAL),
upsampled to the image and scaled to [0, 1]. Other branch types (DKS / DS) are not drawn.

Images: files (any format PIL reads; resized and center-cropped like the val loader, at the run's
``data.val_res``, or ``--resolution``: the network is fully convolutional, so a larger input gives finer
maps, but a model trained on small images may predict differently there), or, without ``--images``, ``--num-images`` evenly spaced val images of the run's
dataset. The figure is saved to ``--out`` and logged to a new MLflow run (tags ``stage`` /
``study`` from ``--tag``, ``source_run``).
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from pipeline.stages.common import (DOCS_EPILOG, ToolError, add_tracking_options, kept_output_dir, load_trained,
                                    log_stage_run, parse_tags, resolve_run, run_cli, run_dataset, scratch_dir,
                                    source_experiment, source_tags, store_uri)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python pipeline/explain.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Draw class activation maps of the main head and each SSAL branch "
                    "(predicted class / group, with the group's class names).",
        epilog=__doc__.split("\n\n", 2)[2] + DOCS_EPILOG)
    src = parser.add_argument_group("trained run (exactly one)")
    src.add_argument("--run", metavar="RUN_ID", help="MLflow run id of a finished training run")
    src.add_argument("--run-dir", metavar="DIR", help="its run folder (config.yaml, final_weights.pt)")
    parser.add_argument("--images", nargs="+", metavar="FILE",
                        help="image files (default: val images of the run's dataset)")
    parser.add_argument("--num-images", type=int, default=4,
                        help="val images when --images is not given (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=0, help="input size (default: the run's data.val_res)")
    parser.add_argument("--out", default="", help="PNG path (default: <run dir>/cams.png; cams.png in a new cams-* "
                                                  "folder in the temp dir, kept, when the run folder is not here)")
    parser.add_argument("--max-names", type=int, default=12, help="class names shown per group (default: %(default)s)")
    add_tracking_options(parser, "the CAMs run", "the source run's experiment", run_name_help="<source run name>-cams")
    return parser


# ----------------------------------------------------------------------------- images


def load_image_files(paths, resolution: int):
    """(normalised batch (N,3,R,R), display images (N,R,R,3) uint8), val-loader geometry."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from ssal_datasets.loader import DEFAULT_CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD

    shown, batch = [], []
    for path in paths:
        try:
            img = Image.open(path).convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise ToolError(f"--images: cannot read {path} ({type(err).__name__}); give image files") from None
        w, h = img.size
        side = int(DEFAULT_CROP_RATIO * min(w, h))
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
        shown.append(arr)
        batch.append((arr.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD)
    x = torch.from_numpy(np.stack(batch).astype(np.float32)).permute(0, 3, 1, 2).contiguous()
    return x, np.stack(shown)


def load_val_images(cfg, count: int, resolution: int):
    import numpy as np

    from ssal_datasets import loader as data_loader
    from ssal_datasets.loader import IMAGENET_MEAN, IMAGENET_STD
    from pipeline.train.factory import Relabelled, label_space

    root, manifest = run_dataset(cfg, "pass --images FILE ...")
    n = int(manifest["splits"]["val"]["count"])
    indices = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))
    loader = data_loader.create_val_loader(root / manifest["splits"]["val"]["beton"], batch_size=len(indices),
                                           num_workers=1, resolution=resolution, device="cpu", distributed=False,
                                           channels_last=False, indices=indices)
    _, _, label_table = label_space(cfg, manifest)  # data.labels=superclass: the run's labels
    if label_table is not None:
        loader = Relabelled(loader, label_table)
    images, labels = next(iter(loader))
    images, labels = images.clone(), labels.clone()
    loader.close()
    shown = (images.permute(0, 2, 3, 1).numpy() * IMAGENET_STD + IMAGENET_MEAN).clip(0, 255).astype(np.uint8)
    return images, shown, labels.tolist()


# ----------------------------------------------------------------------------- CAMs


def compute_cams(model, images):
    """[(head name, predicted index (N,), CAMs (N, R, R) in [0, 1], probability of it (N,), the feature map's
    (h, w))] for the main head and every SSAL branch."""
    import torch
    import torch.nn.functional as F

    features = {}
    hooks = [model.backbone.layer4.register_forward_hook(lambda m, i, o: features.__setitem__("main", o))]
    ssal = [(name, branch) for name, branch in zip(model.branch_names, model.branches)
            if hasattr(branch, "mix") and getattr(branch, "classifier", None) is not None]
    for name, branch in ssal:
        hooks.append(branch.mix.register_forward_hook(lambda m, i, o, name=name: features.__setitem__(name, o)))
    try:
        with torch.no_grad():
            outputs = model(images)
    finally:
        for h in hooks:
            h.remove()
    size = images.shape[-2:]
    result = []
    heads = [("main", model.backbone.fc.weight)] + [(name, branch.classifier.weight) for name, branch in ssal]
    for name, weight in heads:
        if name not in outputs or name not in features:
            continue
        logits = outputs[name].float()
        pred = logits.argmax(1)
        fmap = features[name].float()
        w = weight[:, :fmap.shape[1]].float()  # GapCat: the main fc also reads branch features
        cam = torch.relu(torch.einsum("nc,nchw->nhw", w[pred], fmap))[:, None]
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
        # scaled by the maximum (not min-max: a flat map, e.g. a 1x1 feature map, stays flat instead of
        # blowing rounding noise up to full range)
        cam = cam / cam.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
        prob = logits.softmax(1).gather(1, pred[:, None])[:, 0]
        result.append((name, pred, cam, prob, tuple(fmap.shape[-2:])))
    return result


def draw(shown, cams, class_names, groupings, branch_index, labels, max_names: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n, cols = shown.shape[0], 1 + len(cams)
    fig, axes = plt.subplots(n, cols, figsize=(2.6 * cols, 3.3 * n), dpi=100, squeeze=False)
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(shown[i])
        truth = f"true: {class_names[labels[i]]}" if labels is not None else "input"
        ax.set_title(truth, fontsize=8)
        ax.axis("off")
        for j, (name, pred, cam, prob, map_size) in enumerate(cams, start=1):
            ax = axes[i, j]
            ax.imshow(shown[i])
            if map_size[0] * map_size[1] > 1:
                ax.imshow(cam[i].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            else:  # one position (32 px through 32x down-sampling): a CAM has no "where" to show
                ax.text(0.5, 0.5, f"1x1 feature map\nat {shown.shape[1]} px:\nno spatial map", ha="center",
                        va="center", fontsize=7, transform=ax.transAxes, bbox={"facecolor": "white", "alpha": 0.7})
            ax.axis("off")
            p = int(pred[i])
            if name == "main":
                ax.set_title(f"main: {class_names[p]} ({prob[i]:.2f})", fontsize=8)
            else:
                members = [class_names[c] for c in np.flatnonzero(groupings[branch_index[name]] == p)]
                ax.set_title(f"{name}: group {p} ({prob[i]:.2f})", fontsize=8)
                text = ", ".join(members[:max_names]) + (f", +{len(members) - max_names}" if len(members) > max_names else "")
                ax.text(0.5, -0.04, "\n".join(textwrap.wrap(text, 34)[:4]), transform=ax.transAxes, ha="center",
                        va="top", fontsize=6.5)
    fig.tight_layout()
    return fig


def run(args) -> dict:
    import numpy as np
    import torch

    if args.num_images < 1:
        raise ToolError(f"--num-images: must be >= 1, got {args.num_images}")
    client, src, folder = resolve_run(args.run, args.run_dir, args.tracking_uri, args.runs_root)
    with scratch_dir("explain") as tmp:
        cfg, model, names, groupings = load_trained(client, src, folder, tmp)
    resolution = args.resolution or cfg.data.val_res
    labels = None
    if args.images:
        images, shown = load_image_files(args.images, resolution)
    else:
        images, shown, labels = load_val_images(cfg, args.num_images, resolution)
    torch.set_grad_enabled(False)
    cams = compute_cams(model, images)
    if resolution < 4 * 32:
        print(f"note: at {resolution} px the main head's last feature map is {max(1, resolution // 32)} px wide, so "
              f"its maps are coarse (a larger --resolution gives finer maps, but the predictions of a model trained "
              f"at {cfg.data.val_res} px may change)")
    branch_index = {name: i for i, name in enumerate(model.branch_names)}
    if groupings is None:
        groupings = []
    fig = draw(shown, cams, names, [np.asarray(g) for g in groupings], branch_index, labels, args.max_names)
    out = Path(args.out) if args.out else (folder if folder is not None else kept_output_dir("cams")) / "cams.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    heads = [c[0] for c in cams]
    print(f"saved {out}: {len(shown)} image(s) x heads {', '.join(heads)}")
    for i in range(len(shown)):
        parts = []
        for name, pred, _, prob, _ in cams:
            p = int(pred[i])
            if name == "main":
                parts.append(f"main -> {names[p]} ({prob[i]:.2f})")
            else:
                members = [names[c] for c in np.flatnonzero(np.asarray(groupings[branch_index[name]]) == p)]
                parts.append(f"{name} -> group {p} [{', '.join(members[:6])}{', ...' if len(members) > 6 else ''}]")
        truth = f" (true {names[labels[i]]})" if labels is not None else ""
        print(f"  image {i}{truth}: " + "; ".join(parts))
    result = {"out": str(out), "heads": heads, "run_id": None}
    if not args.no_mlflow:
        uri = store_uri(args.tracking_uri, args.runs_root)
        experiment = args.experiment or source_experiment(client, src, "explain")
        tags = {"method": "explain", "stage": "explain", **source_tags(src, ("arch", "dataset", "study")),
                **parse_tags(args.tag)}
        name = args.run_name or f"{src.info.run_name if src is not None else 'model'}-cams"
        result["run_id"] = log_stage_run(uri, experiment, out.parent / ".explain-tracking", name,
                                         params={"images": len(shown), "resolution": resolution}, tags=tags,
                                         artifacts=[out])
    return result


def main(argv=None) -> int:
    return run_cli(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
