"""Writing a :class:`~ssal_datasets.layouts.Source` to FFCV betons + manifest.json + rejects.txt.

Two passes per split:

1. *check*: every candidate file is decoded (libjpeg DCT-scaled for speed) in a process pool,
   32 files a job, or a run of up to 64 neighbouring members of a tar streamed once
   (:mod:`ssal_datasets.tars`); what cannot be decoded goes to ``rejects.txt`` with its reason.
2. *write*: FFCV's ``DatasetWriter`` (its own worker processes; a tar member is read by its
   offset) writes the good files to a
   temporary name in the output folder, renamed at the end. The dataset object handed to
   FFCV never raises (an exception inside an FFCV writer worker hangs the parent forever):
   a file that fails here although it passed the check is recorded and the write aborts.

Beton fields: ``image`` (RGBImageField), ``label`` (IntField), ``index`` (IntField, the
sample's index in its split, equal to its position in the beton).
"""
from __future__ import annotations

import contextlib
import glob
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ssal_datasets.cpus import usable_cpus
from ssal_datasets.files import Busy, atomic_write, exclusive_lock, temporaries_in, temporary_path
from ssal_datasets.images import Reject, load_rgb, probe
from ssal_datasets.layouts import DataError, Source
from ssal_datasets.manifest import (FORMAT_VERSION, MANIFEST_NAME, REJECTS_NAME, quick_digest, sha256_file,
                                    write_manifest)
from ssal_datasets.tars import TarMember, stream_run
from ssal_datasets.tars import runs as tar_runs

OUTPUT_NAMES = (MANIFEST_NAME, REJECTS_NAME, "train.beton", "val.beton")
WRITE_MODES = ("raw", "jpg", "proportion", "smart")
MIN_PAGE = 1 << 21
FILES_PER_JOB = 32  # files checked by one job of the check pass
#: Held by the process writing a folder (see :func:`prepare_out_dir`); a hidden file that stays.
WRITE_LOCK = ".write.lock"
_claimed_out_dirs: dict[Path, contextlib.ExitStack] = {}


@dataclass
class WriterSettings:
    max_resolution: int | None = None
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    write_mode: str = "proportion"
    smart_threshold: int = 3 * 224 * 224  # smart: JPEG-compress images whose raw size exceeds this (bytes)
    workers: int = 0  # 0: all CPUs
    subset: int | None = None
    seed: int = 0  # makes 'proportion' choices reproducible

    def check(self) -> None:
        if self.write_mode not in WRITE_MODES:
            raise DataError(f"--write-mode {self.write_mode}: choose one of {', '.join(WRITE_MODES)}")
        if self.max_resolution is not None and self.max_resolution < 8:
            raise DataError(f"--max-resolution {self.max_resolution}: must be >= 8 (or omitted)")
        if not 1 <= self.jpeg_quality <= 100:
            raise DataError(f"--jpeg-quality {self.jpeg_quality}: must be in 1..100")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise DataError(f"--compress-probability {self.compress_probability}: must be in [0, 1]")
        if self.subset is not None and self.subset < 1:
            raise DataError(f"--subset {self.subset}: must be >= 1")
        if self.workers < 0:
            raise DataError(f"--workers {self.workers}: must be >= 0 (0 = all CPUs)")

    @property
    def n_workers(self) -> int:
        return self.workers or usable_cpus()


def prepare_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Create ``out`` or check it may be written; with ``overwrite`` drop the previous outputs. This
    process then holds the folder's :data:`WRITE_LOCK` until it ends: a second writer of the same folder
    stops with a one-line error instead of removing the first one's temporaries under it."""
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise DataError(f"--out {out}: exists and is not a directory")
    existing = [n for n in OUTPUT_NAMES if (p / n).exists()]
    if existing and not overwrite:
        raise DataError(f"--out {out}: already holds {', '.join(existing)}; pass --overwrite to replace it")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"--out {out}: cannot create ({err.strerror or err})") from None
    if not os.access(p, os.W_OK):
        raise DataError(f"--out {out}: not writable")
    _claim(p, out)
    if overwrite and (p / MANIFEST_NAME).exists():
        (p / MANIFEST_NAME).unlink()  # the manifest goes first: a crash leaves no stale manifest behind
    for stale in [path for path, _ in temporaries_in(p)] + glob.glob(str(p / ".late-fail-*")):
        try:
            os.unlink(stale)
        except OSError:
            pass
    for stale in glob.glob(str(p / ".demo-src-*")):
        shutil.rmtree(stale, ignore_errors=True)
    return p.resolve()


def _claim(folder: Path, shown: str | os.PathLike) -> None:
    key = folder.resolve()
    if key in _claimed_out_dirs:
        return
    claim = contextlib.ExitStack()
    try:
        claim.enter_context(exclusive_lock(folder / WRITE_LOCK, wait=False))
    except Busy as busy:
        raise DataError(f"--out {shown}: {busy.who} is writing this folder now; wait for it to end or choose "
                        f"another --out") from None
    _claimed_out_dirs[key] = claim  # released when the process ends


# ---------------------------------------------------------------- pass 1: check
def _probe_one(i, source, max_res):
    try:
        h, w = probe(source, max_res)
        return i, h, w, None
    except Reject as err:
        return i, 0, 0, str(err)
    except Exception as err:  # never let one file kill the pool
        return i, 0, 0, f"unexpected error: {type(err).__name__}: {err}"


def _check_job(job):
    """One job of the check pass: a few files, or a run of tar members streamed once (:mod:`tars`)."""
    run, max_res = job
    if isinstance(run[0][1], TarMember):
        return [_probe_one(i, data, max_res) if data is not None else (i, 0, 0, "unreadable: the tar ends or is "
                "damaged before this member") for i, data in stream_run(run)]
    return [_probe_one(i, path, max_res) for i, path in run]


def _check_jobs(items: list[tuple[object, int]], max_res) -> list:
    members = [(i, ref) for i, (ref, _) in enumerate(items) if isinstance(ref, TarMember)]
    files = [(i, ref) for i, (ref, _) in enumerate(items) if not isinstance(ref, TarMember)]
    return [(run, max_res) for run in tar_runs(members)] + \
        [(files[k:k + FILES_PER_JOB], max_res) for k in range(0, len(files), FILES_PER_JOB)]


def _pool(workers: int):
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    return ctx.Pool(workers)


def check_files(items: list[tuple[object, int]], settings: WriterSettings, desc: str):
    from tqdm import tqdm

    shapes = np.zeros((len(items), 2), dtype=np.int64)
    reasons: dict[int, str] = {}
    jobs = _check_jobs(items, settings.max_resolution)
    bar = tqdm(total=len(items), desc=f"check {desc}", unit="img", file=sys.stderr, dynamic_ncols=True)
    workers = min(settings.n_workers, max(1, len(items) // FILES_PER_JOB))
    if workers <= 1:
        results = map(_check_job, jobs)
        pool = None
    else:
        pool = _pool(workers)
        results = pool.imap_unordered(_check_job, jobs)
    try:
        for done in results:
            for i, h, w, reason in done:
                if reason is None:
                    shapes[i] = (h, w)
                else:
                    reasons[i] = reason
            bar.update(len(done))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return shapes, reasons


# ---------------------------------------------------------------- pass 2: write
class _BetonSource:
    """Indexable dataset handed to FFCV's DatasetWriter: (image, label, index). Never raises."""

    def __init__(self, items, seed: int, fail_prefix: str):
        self.items = items
        self.seed = seed
        self.fail_prefix = fail_prefix

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        source, label = self.items[i]
        # RGBImageField draws np.random for 'proportion' right after this call: seed it per sample,
        # so which images are stored as JPEG does not depend on which worker wrote them.
        np.random.seed((self.seed * 1_000_003 + i) % (2**32))
        try:
            img = load_rgb(source)
        except Exception as err:  # noqa: BLE001 - must not raise inside an FFCV worker
            with open(f"{self.fail_prefix}{os.getpid()}", "a", encoding="utf-8") as f:
                f.write(f"{source}\t{str(err).splitlines()[0] if str(err) else type(err).__name__}\n")
            img = np.zeros((8, 8, 3), dtype=np.uint8)
        return img, int(label), int(i)


def _page_size(shapes: np.ndarray) -> int:
    """Smallest power of two >= 2 MiB holding 4 of the largest samples (FFCV hangs if one does not fit)."""
    if len(shapes) == 0:
        return MIN_PAGE
    biggest = int((shapes[:, 0] * shapes[:, 1]).max()) * 3
    need = max(MIN_PAGE, 4 * biggest + 65536)
    total = int((shapes[:, 0] * shapes[:, 1]).sum()) * 3
    if total > (1 << 30):
        need = max(need, 4 * MIN_PAGE)  # FFCV's default page size (8 MiB) for big sets
    return 1 << (need - 1).bit_length()


def write_beton(path: Path, items: list[tuple[str, int]], shapes: np.ndarray, settings: WriterSettings) -> dict:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    tmp = temporary_path(path)
    fail_prefix = str(path.with_name(f".late-fail-{path.stem}-"))
    page_size = _page_size(shapes)
    fields = {
        "image": RGBImageField(write_mode=settings.write_mode, max_resolution=settings.max_resolution,
                               smart_threshold=settings.smart_threshold, jpeg_quality=settings.jpeg_quality,
                               compress_probability=settings.compress_probability),
        "label": IntField(),
        "index": IntField(),
    }
    workers = max(1, min(settings.n_workers, len(items) // 16 or 1))
    try:
        writer = DatasetWriter(str(tmp), fields, page_size=page_size, num_workers=workers)
        writer.from_indexed_dataset(_BetonSource(items, settings.seed, fail_prefix), chunksize=64)
        late = []
        for f in sorted(glob.glob(fail_prefix + "*")):
            late += Path(f).read_text(encoding="utf-8").splitlines()
            os.unlink(f)
        if late:
            first = late[0].replace("\t", ": ")
            raise DataError(f"{len(late)} file(s) failed to decode while writing {path.name} although they passed "
                            f"the check (first: {first}); nothing was written under {path.name}")
        from ffcv.reader import Reader
        n = int(Reader(str(tmp)).num_samples)
        if n != len(items):
            raise DataError(f"{path.name}: wrote {n} samples, expected {len(items)}")
        digest, quick = sha256_file(tmp), quick_digest(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
        for f in glob.glob(fail_prefix + "*"):
            os.unlink(f)
    return {"sha256": digest, "quick_sha256": quick, "page_size": page_size, "bytes": path.stat().st_size,
            "workers": workers}


def write_source(source: Source, out_dir: Path, settings: WriterSettings, *, extra: dict | None = None,
                 log=print) -> dict:
    """Check, write every split, then rejects.txt and manifest.json. Returns the manifest."""
    from ssal_datasets.layouts import take_subset

    settings.check()
    if settings.subset:
        source = take_subset(source, settings.subset)
    for note in source.notes:
        log(note)
    c = len(source.classes)
    started = time.perf_counter()
    splits, reject_lines, stats = {}, [], {}
    for split, items in source.splits.items():
        t0 = time.perf_counter()
        shapes, reasons = check_files(items, settings, split)
        good = [(p, lab) for i, (p, lab) in enumerate(items) if i not in reasons]
        good_shapes = shapes[[i for i in range(len(items)) if i not in reasons]] if items else shapes
        rejected = [(split, str(items[i][0]), r) for i, r in sorted(reasons.items())]
        rejected += [t for t in source.layout_rejects if t[0] == split]
        per_class = np.bincount([lab for _, lab in good], minlength=c).tolist() if good else [0] * c
        if split == "train":
            empty = [source.classes[k].wnid for k in range(c) if per_class[k] == 0]
            if empty:
                k0 = next(k for k in range(c) if per_class[k] == 0)
                example = next(((p, r) for i, r in sorted(reasons.items()) for p, lab in [items[i]] if lab == k0), None)
                raise DataError(f"train: class {empty[0]} has no decodable images"
                                + (f" (and {len(empty) - 1} more classes)" if len(empty) > 1 else "")
                                + (f"; e.g. {example[0]}: {example[1]}" if example else ""))
        if not good:
            raise DataError(f"{split}: no decodable images")
        beton = out_dir / f"{split}.beton"
        info = write_beton(beton, good, good_shapes, settings)
        secs = time.perf_counter() - t0
        splits[split] = {"beton": beton.name, "count": len(good), "per_class": per_class,
                         "rejected": len(rejected), "found": len(items) + len([t for t in source.layout_rejects if t[0] == split]),
                         "sha256": info["sha256"], "quick_sha256": info["quick_sha256"], "bytes": info["bytes"],
                         "page_size": info["page_size"]}
        stats[split] = secs
        reject_lines += rejected
        log(f"{split}: wrote {len(good)} images ({len(rejected)} rejected of {splits[split]['found']} found) "
            f"to {beton} in {secs:.1f} s ({len(good) / max(secs, 1e-9):.0f} img/s)")
    total = time.perf_counter() - started
    atomic_write(out_dir / REJECTS_NAME,
                 "# split\tpath\treason\n" + "".join(f"{s}\t{p}\t{r}\n" for s, p, r in reject_lines))
    manifest = {
        "format": FORMAT_VERSION,
        "dataset": source.dataset,
        "layout": source.layout,
        "num_classes": c,
        "classes": [{"index": i, "wnid": ci.wnid, "name": ci.name, "superclass": ci.superclass,
                     "superclass_name": ci.superclass_name} for i, ci in enumerate(source.classes)],
        "splits": splits,
        "writer": {**asdict(settings), "n_workers": settings.n_workers, "fields": ["image", "label", "index"]},
        "source_root": source.root,
        "seed": None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(total, 2),
    }
    if extra:
        manifest.update(extra)
    write_manifest(out_dir, manifest)
    print_summary(manifest, reject_lines, out_dir, total, log)
    return manifest


def print_summary(manifest: dict, reject_lines, out_dir: Path, seconds: float, log=print) -> None:
    names = [c["name"] for c in manifest["classes"]]
    log("")
    log(f"== {manifest['dataset']}: {manifest['num_classes']} classes -> {out_dir}")
    for split, s in manifest["splits"].items():
        pc = np.array(s["per_class"])
        log(f"  {split:5s}: {s['count']} written, {s['rejected']} rejected, {s['found']} found; per class "
            f"min {pc.min()} / median {int(np.median(pc))} / max {pc.max()}  ({s['bytes'] / 2**20:.1f} MiB)")
        if len(pc) <= 40:
            log("         " + ", ".join(f"{n}:{k}" for n, k in zip(names, pc)))
    n = sum(s["count"] for s in manifest["splits"].values())
    log(f"  total : {n} images in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} img/s)")
    if reject_lines:
        log(f"  rejected {len(reject_lines)} file(s), listed in {out_dir / REJECTS_NAME}:")
        for s, p, r in reject_lines[:20]:
            log(f"    {s}: {p}: {r}")
        if len(reject_lines) > 20:
            log(f"    ... and {len(reject_lines) - 20} more")
    else:
        log("  no rejected files")


def verify(out: str | os.PathLike, log=print) -> list[str]:
    """Re-check a written folder against its manifest; returns a list of problems (empty = fine)."""
    from ssal_datasets.manifest import ManifestError, read_manifest

    out = Path(out)
    if not out.is_dir():
        raise DataError(f"--out {out}: no such directory")
    try:
        m = read_manifest(out)
    except ManifestError as err:
        raise DataError(str(err)) from None
    problems = []
    for split, s in m["splits"].items():
        path = out / s["beton"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        digest = sha256_file(path)
        if digest != s["sha256"]:
            problems.append(f"{path}: sha256 mismatch (manifest {s['sha256'][:12]}..., file {digest[:12]}...)")
            continue
        try:
            from ffcv.reader import Reader
            r = Reader(str(path))
            n = int(r.num_samples)
            meta = r.metadata
            fidx = {name: f"f{i}" for i, name in enumerate(r.field_names)}
            labels = np.asarray(meta[fidx["label"]]).reshape(-1)
            index = np.asarray(meta[fidx["index"]]).reshape(-1)
        except Exception as err:  # noqa: BLE001 - any unreadable beton is a verify failure
            problems.append(f"{path}: unreadable ({type(err).__name__}: {err})")
            continue
        if n != s["count"]:
            problems.append(f"{path}: {n} samples, manifest says {s['count']}")
            continue
        if labels.size and (labels.min() < 0 or labels.max() >= m["num_classes"]):
            problems.append(f"{path}: labels outside 0..{m['num_classes'] - 1}")
            continue
        pc = np.bincount(labels, minlength=m["num_classes"]).tolist()
        if pc != s["per_class"]:
            problems.append(f"{path}: per-class counts differ from the manifest")
        if not np.array_equal(index, np.arange(n)):
            problems.append(f"{path}: index field is not 0..{n - 1}")
        if not problems:
            log(f"{split}: {n} samples, per-class counts and sha256 match")
    return problems


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
