#!/usr/bin/env python
"""Write image datasets to FFCV betons (train.beton, val.beton) + manifest.json + rejects.txt.

Sub-commands:
  imagenet      --root DIR --out DIR   ImageNet as it comes, the layout found by looking: ImageFolder
                                       (train/<wnid>/, val/<wnid>/), devkit (flat val/ + ILSVRC2012_devkit_t12),
                                       Kaggle (ILSVRC/Data/CLS-LOC + LOC_val_solution.csv) or the ILSVRC2012
                                       tars read in place (also: --train-tar F --val-tar F [--devkit P])
  tinyimagenet  --root DIR --out DIR   official tiny-imagenet-200 layout (wnids.txt, words.txt,
                                       train/<wnid>/images/*.JPEG, val/images + val/val_annotations.txt;
                                       test/ has no labels and is skipped)
  demo          --out DIR              built-in hierarchical demo set, generated on the spot
  verify        --out DIR              re-check betons against manifest.json (exit 1 on mismatch)

Every file is checked first: CMYK / grayscale / palette / PNG-named-.JPEG images are converted
to RGB; what cannot be decoded (truncated, empty, not an image) is skipped and listed with its
reason in rejects.txt and the summary (written + rejected = found). Betons are written under a
temporary name and renamed at the end. Errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

PROG = "write_ffcv.py"

# Per-dataset defaults of the writer knobs (FFCV's ImageNet recipe: max side 500 px,
# half of the images stored as JPEG at quality 90, the rest raw).
DEFAULTS = {
    "imagenet": dict(max_resolution=500, write_mode="proportion", compress_probability=0.5, jpeg_quality=90),
    "tinyimagenet": dict(max_resolution=None, write_mode="raw", compress_probability=0.5, jpeg_quality=90),
    "demo": dict(max_resolution=None, write_mode="raw", compress_probability=0.5, jpeg_quality=90),
}


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _add_writer_knobs(p: argparse.ArgumentParser, dataset: str) -> None:
    d = DEFAULTS[dataset]
    g = p.add_argument_group("writer knobs (FFCV RGBImageField; defaults for this dataset shown)")
    g.add_argument("--max-resolution", type=_positive_int, default=d["max_resolution"], metavar="PX",
                   help=f"resize so that the longer side is at most PX (INTER_AREA); 0 or omitted = keep "
                        f"(default: {d['max_resolution'] or 'keep'})")
    g.add_argument("--write-mode", choices=("raw", "jpg", "proportion", "smart"), default=d["write_mode"],
                   help="raw: uint8 pixels (fast to read, big); jpg: JPEG-encode every image; proportion: "
                        "JPEG-encode a random --compress-probability share (seeded), the rest raw; smart: JPEG "
                        "only images whose raw size exceeds --smart-threshold bytes "
                        f"(default: {d['write_mode']})")
    g.add_argument("--compress-probability", type=float, default=d["compress_probability"], metavar="P",
                   help=f"share of images stored as JPEG in proportion mode (default: {d['compress_probability']})")
    g.add_argument("--jpeg-quality", type=int, default=d["jpeg_quality"], metavar="Q",
                   help=f"JPEG quality 1..100 for images stored as JPEG (default: {d['jpeg_quality']})")
    g.add_argument("--smart-threshold", type=int, default=3 * 224 * 224, metavar="BYTES",
                   help="smart mode: JPEG-encode images whose raw size exceeds BYTES (default: 150528)")
    g.add_argument("--workers", type=_positive_int, default=0, metavar="N",
                   help="processes for checking, generating and writing; 0 = all CPUs (default: 0)")
    g.add_argument("--subset", type=int, default=None, metavar="N",
                   help="keep only the first N images (by file name) of every class in every split, for "
                        "quick trials (default: all)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the proportion-mode choices" + (" and of the generated images" if dataset == "demo" else "")
                        + " (default: 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the betons / manifest / rejects.txt already in --out (default: refuse)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog="Run '%(prog)s SUB-COMMAND --help' for the knobs of each sub-command.\n"
                                            "more: docs/data.md (layouts, manifest, verify), datasets/README.md",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="SUB-COMMAND", required=True)

    p = sub.add_parser("imagenet", help="ImageNet as it comes: ImageFolder, devkit, Kaggle or the ILSVRC2012 tars",
                       description="Write ImageNet to train.beton / val.beton, the layout found by looking at --root "
                                   "and named in manifest.json: imagefolder (train/<wnid>/*, val/<wnid>/*); devkit "
                                   "(train/<wnid>/*, a flat val/ of ILSVRC2012_val_*.JPEG, and ILSVRC2012_devkit_t12/ "
                                   "or its tar, whose ground truth and meta.mat give the val labels); kaggle "
                                   "(ILSVRC/Data/CLS-LOC/{train/<wnid>,val} + LOC_val_solution.csv); ilsvrc-tars "
                                   "(ILSVRC2012_img_train.tar + ILSVRC2012_img_val.tar + the devkit, read in place: "
                                   "nothing is extracted). Class i is the i-th train wnid in sorted order in every "
                                   "layout; names come from the devkit's meta.mat / LOC_synset_mapping.txt / words.txt, "
                                   "else torchvision's ImageNet-1k list (1000 classes), else the wnid. Counts other "
                                   "than ImageNet-1k's (1,281,167 train, 50,000 val, 1,000 classes) give one warning "
                                   "line. Layouts and figures: docs/data.md.")
    p.add_argument("--root", default=None, help="the dataset folder, in any of the layouts above")
    p.add_argument("--train-tar", default=None, metavar="FILE",
                   help="instead of --root: the path of ILSVRC2012_img_train.tar (with --val-tar)")
    p.add_argument("--val-tar", default=None, metavar="FILE", help="instead of --root: ILSVRC2012_img_val.tar")
    p.add_argument("--devkit", default=None, metavar="PATH",
                   help="ILSVRC2012_devkit_t12 (folder or tar) for the val labels of a flat val/ or of the val tar "
                        "(default: found next to val/ or the val tar)")
    p.add_argument("--out", required=True, help="output folder for the betons, manifest.json and rejects.txt")
    _add_writer_knobs(p, "imagenet")

    p = sub.add_parser("tinyimagenet", help="official tiny-imagenet-200 layout",
                       description="Write the official tiny-imagenet-200 folder (wnids.txt, words.txt, "
                                   "train/<wnid>/images/*.JPEG, val/images/*.JPEG + val/val_annotations.txt). Class i "
                                   "is the i-th wnid in sorted order, names from words.txt. test/ has no labels and "
                                   "is skipped with a message.")
    p.add_argument("--root", required=True, help="the tiny-imagenet-200 folder")
    p.add_argument("--out", required=True, help="output folder for the betons, manifest.json and rejects.txt")
    _add_writer_knobs(p, "tinyimagenet")

    p = sub.add_parser("demo", help="built-in hierarchical demo set (no download)",
                       description="Generate the built-in demo set (noisy textured backgrounds with one striped "
                                   "object; super-class = shape family + base hue, class = stripe frequency + small "
                                   "hue offset; see datasets/demo.py) as JPEG files in a temporary folder, then write "
                                   "it like an ImageNet layout. Deterministic from --seed; the manifest records each "
                                   "class's planted super-class.")
    p.add_argument("--out", required=True, help="output folder for the betons, manifest.json and rejects.txt")
    p.add_argument("--num-classes", type=int, default=32, help="number of classes (default: 32)")
    p.add_argument("--num-superclasses", type=int, default=8, help="number of planted super-classes (default: 8)")
    p.add_argument("--images-per-class", type=int, default=80, help="train images per class (default: 80)")
    p.add_argument("--val-images-per-class", type=int, default=20, help="val images per class (default: 20)")
    p.add_argument("--image-size", type=int, default=64, help="side of the square images in px (default: 64)")
    p.add_argument("--keep-jpegs", metavar="DIR", default=None,
                   help="also keep the generated JPEG tree (ImageNet layout) in DIR (default: temporary, removed)")
    _add_writer_knobs(p, "demo")

    p = sub.add_parser("verify", help="re-check betons against manifest.json",
                       description="Re-check a folder written by this script: every beton named in manifest.json "
                                   "exists, has the recorded sha256 and sample count, and its label / index fields "
                                   "give the recorded per-class counts and 0..n-1. Exit status 1 on any mismatch.")
    p.add_argument("--out", required=True, help="folder holding manifest.json and the betons")
    return parser


def _settings(args):
    from ssal_datasets.writer import WriterSettings
    settings = WriterSettings(max_resolution=args.max_resolution or None, jpeg_quality=args.jpeg_quality,
                              compress_probability=args.compress_probability, write_mode=args.write_mode,
                              smart_threshold=args.smart_threshold, workers=args.workers, subset=args.subset,
                              seed=args.seed)
    settings.check()
    return settings


def run(args, log=print) -> int:
    from ssal_datasets import layouts, writer

    if args.command == "verify":
        problems = writer.verify(args.out, log=log)
        if problems:
            for p in problems:
                print(f"{PROG}: verify failed: {p}", file=sys.stderr)
            return 1
        log(f"verify: {args.out} OK")
        return 0

    settings = _settings(args)
    if args.command == "imagenet":
        from ssal_datasets import imagenet_layouts
        source = imagenet_layouts.scan(args.root, train_tar=args.train_tar, val_tar=args.val_tar,
                                       devkit=args.devkit)  # layout errors before touching --out
        warning = imagenet_layouts.known_count_warning(source)
        if warning:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        out = writer.prepare_out_dir(args.out, args.overwrite)
        writer.write_source(source, out, settings, log=log)
        return 0
    if args.command == "tinyimagenet":
        source = layouts.scan_tinyimagenet(args.root)  # layout errors before touching --out
        out = writer.prepare_out_dir(args.out, args.overwrite)
        writer.write_source(source, out, settings, log=log)
        return 0

    # demo
    from ssal_datasets.demo import DemoSpec, generate_tree
    spec = DemoSpec(num_classes=args.num_classes, num_superclasses=args.num_superclasses,
                    train_per_class=args.images_per_class, val_per_class=args.val_images_per_class,
                    image_size=args.image_size, seed=args.seed)
    spec.check()
    out = writer.prepare_out_dir(args.out, args.overwrite)
    keep = args.keep_jpegs
    if keep and os.path.exists(keep) and os.listdir(keep) and not args.overwrite:
        raise layouts.DataError(f"--keep-jpegs {keep}: exists and is not empty; pass --overwrite or choose another")
    tmp = tempfile.mkdtemp(prefix=".demo-src-", dir=str(out)) if not keep else None
    src_root = keep or tmp
    try:
        if keep:
            writer.remove_tree(keep)
        t0 = time.perf_counter()
        table = generate_tree(spec, src_root, workers=settings.n_workers)
        n = spec.num_classes * (spec.train_per_class + spec.val_per_class)
        log(f"demo: generated {n} JPEG images ({spec.num_classes} classes in {spec.num_superclasses} super-classes) "
            f"in {time.perf_counter() - t0:.1f} s")
        source = layouts.scan_imagenet(src_root)
        source.dataset = "demo"
        source.notes = []
        for ci, row in zip(source.classes, table):
            assert ci.wnid == row["wnid"]
            ci.name, ci.superclass, ci.superclass_name = row["name"], row["superclass"], row["superclass_name"]
        source.root = os.path.abspath(keep) if keep else None
        extra = {"seed": spec.seed, "num_superclasses": spec.num_superclasses,
                 "demo": {"image_size": spec.image_size, "train_per_class": spec.train_per_class,
                          "val_per_class": spec.val_per_class}}
        writer.write_source(source, out, settings, extra=extra, log=log)
    finally:
        if tmp:
            writer.remove_tree(tmp)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ssal_datasets.layouts import DataError
    try:
        return run(args)
    except DataError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written under the final names", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
