"""SSAL grouping stage: class groupings from a baseline's confusion matrix.

    python pipeline/groups.py --from-run RUN_ID --k 200 334 500 --criterion join --out groups.json
    python pipeline/groups.py --from-run-dir runs/demo/baseline --k 8 --out groups.json
    python pipeline/groups.py --confusion confusion.npy --data-root data/demo --k 8 --out groups.json
    python pipeline/groups.py --from-run-dir runs/demo/baseline --k 8 --matrix soft --out groups.json
    python pipeline/groups.py --import-authors imagenet_200_group_similar_v2.txt --data-root data/imagenet \
        --out groups.json

The confusion matrix comes from held-out data when the run has it: a run trained with
``eval.holdout_fraction > 0`` logs ``confusion_holdout.npy`` (a seeded share of the *train* split,
never trained on). Without it the val confusion ``confusion_main.npy`` is used, with a warning
(the groups then peek at the split the final numbers are measured on). The JSON says which
(``metadata.confusion_split``). ``--matrix soft`` reads the *soft* confusion of the same images
instead (``confusion_soft_holdout.npy`` / ``confusion_soft_main.npy``: the model's softmax
averaged per true class), which on few held-out images separates confusable classes far better
than the hard counts (most of whose off-diagonal cells are 0).

Each grouping is ``ssal_models.grouping.group_classes(confusion, k, criterion, seed, variant)``;
``--variant authors`` reproduces the SSAL authors' ``create_grouping_v2`` (raw-count distance,
groups full at 1.1*C/k, no minimum size), ``paper`` (default) is the balanced ceil(C/k) version.

``--import-authors FILE ...`` converts the authors' published label files (one group index per
class per line, written as a float, in torchvision's ImageNet class order = sorted wnids) into
our JSON, one grouping per file in the order given, mapping their class order onto the
manifest's via the wnids (no MLflow run).
*Choice* (documented): on a sparse hard-count confusion many class distances tie at 1, and the
farthest-point seeding then picks seeds by the seeded tie-break, sometimes two in one cluster of
confusable classes. ``--restarts R`` (default 10) runs seeds ``seed .. seed+R-1`` and keeps the
grouping with the best criterion objective -- the largest within-group share of the confusion
for ``join``, the smallest for ``split`` (no labels involved); ``--restarts 1`` is the plain
algorithm. The output is a deterministic function of (confusion, k, criterion, seed, restarts).

The JSON (``ssal_models.grouping.save_groupings`` layout: class names of each group on one line)
is written to ``--out`` and logged as an artifact of a new MLflow run (tags ``stage``, ``study``
from ``--tag``; the source run's experiment unless ``--experiment``). When the dataset manifest
has planted super-classes (the demo set), the adjusted Rand index of each grouping against them is
printed and logged as ``groups/ari/k<k>``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from pipeline.stages.common import (DOCS_EPILOG, ToolError, add_tracking_options, log_stage_run, parse_tags, run_cli,
                                    scratch_dir, source_experiment, source_tags, store_uri)
from pipeline.tracking import runs
from pipeline.tracking.constants import RUN_ID_FILE

HOLDOUT_FILE = "confusion_holdout.npy"
VAL_FILE = "confusion_main.npy"
SOFT_FILES = {HOLDOUT_FILE: "confusion_soft_holdout.npy", VAL_FILE: "confusion_soft_main.npy"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python pipeline/groups.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compute SSAL class groupings (one per --k) from a trained run's confusion matrix and write "
                    "them as one human-readable JSON (class names per group), logged to MLflow.",
        epilog=(__doc__.split("\n\n", 2)[2] if __doc__ else "") + DOCS_EPILOG)
    src = parser.add_argument_group("confusion source (exactly one)")
    src.add_argument("--from-run", metavar="RUN_ID", help="MLflow run id of a finished (baseline) training run")
    src.add_argument("--from-run-dir", metavar="DIR", nargs="+",
                     help=f"a training run folder (holds {RUN_ID_FILE} and the confusion .npy files); several (the "
                          "seeds of one stage): their mean confusion, and each one's grouping's ARI alone")
    src.add_argument("--confusion", metavar="FILE.npy", help="a C x C confusion matrix (rows = true class)")
    src.add_argument("--import-authors", nargs="+", metavar="FILE",
                     help="the SSAL authors' label files (e.g. imagenet_200_group_similar_v2.txt), one grouping "
                          "per file; needs --data-root; no --k")
    parser.add_argument("--split", choices=("auto", "holdout", "val"), default="auto",
                        help="with a run: which confusion; auto = holdout if logged, else val with a warning "
                             "(default: %(default)s)")
    parser.add_argument("--matrix", choices=("hard", "soft"), default="hard",
                        help="with a run: hard counts or the soft (mean softmax) confusion (default: %(default)s)")
    parser.add_argument("--k", type=int, nargs="+", metavar="K",
                        help="number of groups of each grouping (one grouping per value, in branch order)")
    parser.add_argument("--criterion", choices=("join", "split"), default="join",
                        help="join: confusable classes together; split: apart (default: %(default)s)")
    parser.add_argument("--variant", choices=("paper", "authors"), default="paper",
                        help="paper: balanced groups of <= ceil(C/k); authors: the SSAL authors' create_grouping_v2 "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="tie-break seed (default: %(default)s)")
    parser.add_argument("--restarts", type=int, default=10,
                        help="seeds tried per grouping, best criterion objective kept (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="FILE.json", help="where to write the groupings JSON")
    parser.add_argument("--data-root", metavar="DIR", help="dataset folder with manifest.json (class names, planted "
                                                           "super-classes); default: the source run's data.root")
    add_tracking_options(parser, "the groups run", "the source run's, else 'groups'",
                         run_name_help="groups-<criterion>-k<k...>", no_mlflow_help="write the JSON only")
    return parser


# ----------------------------------------------------------------------------- pieces


def objective(confusion: np.ndarray, grouping: np.ndarray) -> float:
    """Share of the off-diagonal row-normalised confusion that falls within groups."""
    totals = confusion.sum(axis=1, keepdims=True)
    rates = np.divide(confusion, totals, out=np.zeros_like(confusion, dtype=float), where=totals > 0)
    np.fill_diagonal(rates, 0.0)
    total = rates.sum()
    if total <= 0:
        return 0.0
    same = grouping[:, None] == grouping[None, :]
    return float(rates[same].sum() / total)


def best_grouping(confusion: np.ndarray, k: int, criterion: str, seed: int, restarts: int,
                  variant: str = "paper") -> tuple[np.ndarray, dict]:
    from ssal_models.grouping import group_classes

    best, best_score, best_seed, scores = None, None, None, []
    for s in range(seed, seed + max(1, restarts)):
        g = group_classes(confusion, k, criterion, seed=s, variant=variant)
        score = objective(confusion, g)
        scores.append(score)
        better = best is None or (score > best_score + 1e-12 if criterion == "join" else score < best_score - 1e-12)
        if better:
            best, best_score, best_seed = g, score, s
    return best, {"k": int(k), "seed_used": int(best_seed), "within_group_confusion": round(best_score, 6),
                  "restart_scores": [round(x, 6) for x in scores]}


def adjusted_rand(labels_true, labels_pred) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(labels_true), np.asarray(labels_pred)))


def load_confusion_file(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise ToolError(f"--confusion: no such file {path}")
    try:
        matrix = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001
        raise ToolError(f"--confusion: {path} is not a .npy array ({type(err).__name__}); save it with numpy.save") \
            from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ToolError(f"--confusion: {path} has shape {matrix.shape}; expected a square C x C matrix")
    return matrix.astype(np.float64)


def _run_file(mlflow_client, run, run_dir: str | None, name: str, tmp: str) -> Path | None:
    path = runs.run_file(mlflow_client, run, name, tmp) if mlflow_client is not None else None
    if path is None and run_dir and (Path(run_dir) / name).is_file():
        path = Path(run_dir) / name
    return path


def confusion_from_run(args, mlflow_client, run, tmp: str, run_dir: str | None = None
                       ) -> tuple[np.ndarray, str, str, int | None]:
    """(confusion, split, where, images) from the run: holdout if logged (or asked), else val with a warning.
    ``images``: how many images the matrix comes from (a soft matrix is row-normalised: its hard twin's sum)."""
    wanted = {"auto": [HOLDOUT_FILE, VAL_FILE], "holdout": [HOLDOUT_FILE], "val": [VAL_FILE]}[args.split]
    for hard_name in wanted:
        name = SOFT_FILES[hard_name] if args.matrix == "soft" else hard_name
        path = _run_file(mlflow_client, run, run_dir, name, tmp)
        if path is None:
            continue
        split = "holdout" if hard_name == HOLDOUT_FILE else "val"
        hard = path if args.matrix == "hard" else _run_file(mlflow_client, run, run_dir, hard_name, tmp)
        images = None if hard is None else int(round(float(np.load(hard).sum())))
        if split == "val" and args.split == "auto":
            msg = (f"run {run.info.run_id if run else run_dir} has no {wanted[0]}: using the VAL "
                   f"confusion ({name}); the groups then depend on the split the final numbers are measured on. "
                   f"Train the baseline with eval.holdout_fraction=0.1 to avoid this.")
            print(f"warning: {msg}", file=sys.stderr)
        return np.load(path).astype(np.float64), split, str(path), images
    if args.matrix == "soft":
        wanted = [SOFT_FILES[name] for name in wanted]
    hint = " (runs logged before the soft confusion existed have none: use --matrix hard)" if args.matrix == "soft" else ""
    raise ToolError(f"run {run.info.run_id if run else run_dir} has no {' or '.join(wanted)} "
                    f"(not a finished training run?{hint}); pass --confusion FILE.npy instead")


def class_info(data_root: str | None, num_classes: int) -> tuple[list[str], list[int] | None, str]:
    if not data_root:
        return [str(i) for i in range(num_classes)], None, ""
    from ssal_datasets.manifest import class_names, read_manifest, superclasses
    from pipeline.train.config import resolve_path

    root = resolve_path(data_root)
    try:
        manifest = read_manifest(root)
    except Exception as err:  # noqa: BLE001
        raise ToolError(f"--data-root: cannot read {root}/manifest.json ({err}); pass the dataset folder") from None
    names = class_names(manifest)
    if len(names) != num_classes:
        raise ToolError(f"--data-root: {root} has {len(names)} classes but the confusion matrix has {num_classes}; "
                        f"pass the dataset the run was trained on")
    return names, superclasses(manifest), str(root)


def summary_lines(groupings, stats, names, ari) -> list[str]:
    lines = []
    for g, st in zip(groupings, stats):
        sizes = np.bincount(g)
        line = (f"k={st['k']}: group sizes {sizes.min()}..{sizes.max()} (mean {sizes.mean():.1f}); "
                f"within-group confusion {100 * st['within_group_confusion']:.1f}% (seed {st['seed_used']})")
        if ari is not None:
            line += f"; ARI vs planted super-classes {ari[st['k']]:.3f}"
        lines.append(line)
        for gi in range(min(3, int(g.max()) + 1)):
            members = [names[c] for c in np.flatnonzero(g == gi)]
            shown = ", ".join(members[:8]) + (f", ... (+{len(members) - 8})" if len(members) > 8 else "")
            lines.append(f"    group {gi}: {shown}")
    return lines


# ----------------------------------------------------------------------------- the authors' label files


def read_authors_file(path: str, num_classes: int) -> np.ndarray:
    """One of the authors' label files as a validated grouping (their class order), or ToolError."""
    file = Path(path)
    if not file.is_file():
        raise ToolError(f"--import-authors: no such file {file}")
    lines = [line.strip() for line in file.read_text(encoding="utf-8", errors="replace").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) != num_classes:
        raise ToolError(f"--import-authors: {file} has {len(lines)} lines but the dataset has {num_classes} classes "
                        f"(one group index per class, in sorted-wnid order); pass the file made for this dataset")
    values = np.empty(num_classes)
    for number, line in enumerate(lines, 1):
        try:
            values[number - 1] = float(line)
        except ValueError:
            raise ToolError(f"--import-authors: {file} line {number}: {line[:40]!r} is not a number; "
                            f"expected one group index per line") from None
    bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)) | (values < 0))
    if bad.size:
        raise ToolError(f"--import-authors: {file} line {bad[0] + 1}: {lines[bad[0]]!r} is not a group index "
                        f"(a non-negative integer)")
    labels = values.astype(np.int64)
    used = np.unique(labels)
    if used.size < 2 or used[-1] != used.size - 1:
        missing = sorted(set(range(int(used[-1]) + 1)) - set(used.tolist()))[:5]
        raise ToolError(f"--import-authors: {file} uses group indices 0..{used[-1]} but no class is in group(s) "
                        f"{missing}; every group 0..k-1 must be used (k >= 2)")
    return labels


def import_authors(args) -> dict:
    from ssal_datasets.manifest import class_names, read_manifest
    from pipeline.train.config import resolve_path
    from ssal_models.grouping import save_groupings

    if not args.data_root:
        raise ToolError("--import-authors needs --data-root DIR (the dataset folder with manifest.json: the "
                        "wnids map the authors' sorted-wnid order onto ours)")
    root = resolve_path(args.data_root)
    try:
        manifest = read_manifest(root)
    except Exception as err:  # noqa: BLE001
        raise ToolError(f"--data-root: cannot read {root}/manifest.json ({err}); pass the dataset folder") from None
    wnids = [c["wnid"] for c in manifest["classes"]]
    if len(set(wnids)) != len(wnids):
        raise ToolError(f"--data-root: {root}/manifest.json repeats wnids; cannot map the authors' class order")
    # the authors' line i belongs to the i-th wnid in sorted order (torchvision's ImageFolder order)
    line_of = {wnid: i for i, wnid in enumerate(sorted(wnids))}
    order = np.array([line_of[w] for w in wnids])
    groupings = [read_authors_file(path, len(wnids))[order] for path in args.import_authors]
    names = class_names(manifest)
    metadata = {"source": "authors' label files", "files": [str(Path(f).resolve()) for f in args.import_authors],
                "class_order_of_files": "sorted wnids", "data_root": str(root)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_groupings(out, groupings, names, metadata=metadata)
    print(f"wrote {out}: {len(groupings)} grouping(s) of {len(names)} classes imported from the authors' files")
    for path, g in zip(args.import_authors, groupings):
        sizes = np.bincount(g)
        print(f"{Path(path).name}: k={sizes.size}, group sizes {sizes.min()}..{sizes.max()} (mean {sizes.mean():.1f})")
    return {"out": str(out), "groupings": groupings}


# ----------------------------------------------------------------------------- main


def run(args) -> dict:
    sources = [x for x in (args.from_run, args.from_run_dir, args.confusion, args.import_authors) if x]
    if len(sources) != 1:
        raise ToolError("give exactly one of --from-run RUN_ID, --from-run-dir DIR, --confusion FILE.npy, "
                        "--import-authors FILE ...")
    if args.import_authors:
        if args.k:
            raise ToolError("--k: not used with --import-authors (each file fixes its own number of groups)")
        return import_authors(args)
    if not args.k:
        raise ToolError("--k: give the number of groups of each grouping, e.g. --k 200 334 500")
    if args.restarts < 1:
        raise ToolError(f"--restarts: must be >= 1, got {args.restarts}")
    out = Path(args.out)
    uri = mlflow_client = run_obj = None
    if args.from_run or args.from_run_dir or not args.no_mlflow:
        uri = store_uri(args.tracking_uri, args.runs_root)
        mlflow_client = runs.client(uri)
    source: dict = {}
    data_root = args.data_root
    per_seed: dict[str, np.ndarray] = {}  # several run folders: seed -> that run's own confusion
    if args.confusion:
        confusion, split, where = load_confusion_file(args.confusion), "file", str(Path(args.confusion).resolve())
        source, images = {"file": where}, None
    else:
        sources = []
        for run_dir in args.from_run_dir or [None]:
            if run_dir and not Path(run_dir).is_dir():
                raise ToolError(f"--from-run-dir: no such folder {run_dir}")
            run_id = args.from_run or runs.run_id_from_dir(run_dir)
            run_obj = runs.get_run(mlflow_client, run_id)
            with scratch_dir("groups") as tmp:  # a downloaded confusion is read into memory
                matrix, split, where, count = confusion_from_run(args, mlflow_client, run_obj, tmp, run_dir)
            seed = run_obj.data.params.get("train.seed", str(len(sources)))
            sources.append({"run_id": run_id, "run_name": run_obj.info.run_name, "file": Path(where).name,
                            "experiment_id": run_obj.info.experiment_id, "seed": seed, "images": count})
            per_seed[seed] = matrix
        # soft matrices are per-class means: their mean; hard counts add up
        matrices = list(per_seed.values())
        confusion = sum(matrices) / (len(matrices) if args.matrix == "soft" else 1)
        counts = [src["images"] for src in sources]
        images = None if None in counts else sum(counts)
        source = sources[0] if len(sources) == 1 else {"runs": sources}
        if len(sources) == 1:
            per_seed = {}
        if not data_root:
            data_root = run_obj.data.params.get("data.root") or None
    num_classes = confusion.shape[0]
    for k in args.k:
        if not 2 <= k <= num_classes // 2:
            raise ToolError(f"--k {k}: need 2 <= k <= C/2 = {num_classes // 2} for this {num_classes}-class confusion")
    names, planted, root = class_info(data_root, num_classes)

    groupings, stats = [], []
    for k in args.k:
        g, st = best_grouping(confusion, k, args.criterion, args.seed, args.restarts, args.variant)
        groupings.append(g)
        stats.append(st)
    ari = ari_per_seed = None
    if planted is not None:
        ari = {st["k"]: adjusted_rand(planted, g) for g, st in zip(groupings, stats)}
        # each seed's grouping alone: is the recovery stable, or only on the mean?
        ari_per_seed = {seed: {k: adjusted_rand(planted, best_grouping(matrix, k, args.criterion, args.seed,
                                                                       args.restarts, args.variant)[0])
                               for k in args.k} for seed, matrix in per_seed.items()}
    split_note = {"holdout": "held-out share of the train split (eval.holdout_fraction), never trained on",
                  "val": "val split (no holdout confusion was logged): the groups saw the evaluation split",
                  "file": "a confusion file given on the command line"}[split]
    metadata = {"criterion": args.criterion, "variant": args.variant, "matrix": args.matrix, "k": list(args.k),
                "seed": args.seed, "restarts": args.restarts, "confusion_split": split, "confusion_split_note": split_note, "source": source,
                "num_samples_in_confusion": images if args.matrix == "soft" else int(round(float(confusion.sum()))),
                "data_root": root, "groupings": stats}
    if ari is not None:
        metadata["ari_vs_planted_superclasses"] = {str(k): round(v, 4) for k, v in ari.items()}
    if ari_per_seed:
        metadata["ari_vs_planted_superclasses_per_seed"] = {
            seed: {str(k): round(v, 4) for k, v in by_k.items()} for seed, by_k in ari_per_seed.items()}

    from ssal_models.grouping import save_groupings

    out.parent.mkdir(parents=True, exist_ok=True)
    save_groupings(out, groupings, names, metadata=metadata)
    mean_of = f"mean of {len(per_seed)} runs' " if per_seed else ""
    print(f"wrote {out}: {len(groupings)} grouping(s) of {num_classes} classes, criterion {args.criterion}, "
          f"variant {args.variant}, {mean_of}{args.matrix} confusion from {split} "
          f"({metadata['num_samples_in_confusion'] or 'an unknown number of'} images, {where})")
    for line in summary_lines(groupings, stats, names, ari):
        print(line)
    for seed, by_k in (ari_per_seed or {}).items():
        print(f"seed {seed} alone: " + ", ".join(f"k={k} ARI {v:.3f}" for k, v in by_k.items()))

    result = {"out": str(out), "split": split, "ari": ari, "stats": stats, "run_id": None}
    if not args.no_mlflow:
        experiment = args.experiment or source_experiment(mlflow_client, run_obj, "groups")
        tags = {"stage": "groups", "method": "groups", "criterion": args.criterion, "confusion_split": split,
                "variant": args.variant, "matrix": args.matrix, **source_tags(run_obj, ("arch", "dataset", "study")),
                **parse_tags(args.tag)}
        name = args.run_name or f"groups-{args.criterion}-k{'-'.join(map(str, args.k))}"
        params = {"k": list(args.k), "criterion": args.criterion, "variant": args.variant, "matrix": args.matrix,
                  "seed": args.seed, "restarts": args.restarts,
                  "confusion_split": split, "source": json.dumps(source)}
        metrics = {f"groups/within_group_confusion/k{st['k']}": st["within_group_confusion"] for st in stats}
        if ari is not None:
            metrics.update({f"groups/ari/k{k}": v for k, v in ari.items()})
        for seed, by_k in (ari_per_seed or {}).items():
            metrics.update({f"groups/ari_seed{seed}/k{k}": v for k, v in by_k.items()})
        result["run_id"] = log_stage_run(uri, experiment, out.parent / f".{out.stem}-tracking", name, params=params,
                                         tags=tags, metrics=metrics, artifacts=[out])
    return result


def main(argv=None) -> int:
    # ValueError: from the grouping code (a bad matrix / k)
    return run_cli(build_parser, run, argv, also_usage_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
