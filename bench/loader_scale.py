#!/usr/bin/env python
"""Loader memory vs dataset size: RSS per rank and img/s of the train loader for ``os_cache`` on/off x
``random`` / ``quasi_random`` order, with 1 and 2 ranks (gloo), on generated betons of N small images.

What it shows: with ``os_cache=true`` a process maps the whole beton and every page it touches stays
in its RSS as *file* pages (RssFile: the kernel's page cache, shared by the ranks of a node and
evictable, but the beton must fit in RAM or every epoch re-reads it from disk in 4 KB pieces).
With ``os_cache=false`` FFCV reads whole beton pages into the process's own *anonymous* memory
(RssAnon), keeping a page from its first sample's batch to its last one's: in ``random`` order that
is nearly every page for the whole epoch (each rank holds the whole beton), in ``quasi_random``
order a window of ``2 x batch_size`` pages, whatever the size of the beton.

Each case runs in a fresh process (ranks: fresh processes too) so that one case's memory does not
show in the next; a thread samples /proc/self/status every 20 ms. The beton's pages are dropped
from the page cache before each case (``posix_fadvise DONTNEED`` on that file only; ``--warm``
keeps them), so every case's first epoch reads from disk as a real first epoch would; the later
epochs read what is cached (page cache or the process's pages). img/s is measured from each
epoch's first batch (after the JIT compilation) to its end, summed over the ranks; ratios are to
os_cache=true + random with as many ranks. "vs" figures are side by side in one run, but this box
is shared: read img/s as rough, the memory columns as exact.

    python bench/loader_scale.py                          # 20k images, all 8 cases (a few minutes)
    python bench/loader_scale.py --sizes 20000 200000     # + 200k images (~1.3 GB of disk, ~10 min)
    python bench/loader_scale.py --work /scratch/x --keep # betons written there and kept
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ACCESS = [(True, "random"), (True, "quasi_random"), (False, "random"), (False, "quasi_random")]
MIB = 1 << 20


# ------------------------------------------------------------------ beton
class _Noise:
    """N random RGB images (deterministic per index), label = index % 100."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        import numpy as np
        img = np.random.default_rng(i).integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
        return img, i % 100, i


def write_beton(path: Path, n: int, size: int, page_size: int, workers: int) -> float:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    t0 = time.perf_counter()
    tmp = path.with_name(path.name + ".tmp")
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField(), "index": IntField()}
    DatasetWriter(str(tmp), fields, page_size=page_size, num_workers=workers).from_indexed_dataset(
        _Noise(n, size), chunksize=256)
    os.replace(tmp, path)
    return time.perf_counter() - t0


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ one rank of one case
class RssMonitor(threading.Thread):
    """Peaks of VmRSS / RssAnon / RssFile of this process (MiB), sampled every ``every`` s."""

    KEYS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, every: float = 0.02):
        super().__init__(daemon=True)
        self.every = every
        self.peak = self.read()
        self._done = threading.Event()

    @classmethod
    def read(cls) -> dict[str, float]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in cls.KEYS:
                    out[key] = int(rest.split()[0]) / 1024
        return out

    def run(self):
        while not self._done.wait(self.every):
            for k, v in self.read().items():
                self.peak[k] = max(self.peak[k], v)

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join()
        return self.peak


def run_rank(rank: int, case: dict) -> None:
    import torch
    import torch.distributed as dist

    world = case["ranks"]
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{case['init']}", rank=rank, world_size=world)
    from ssal_datasets import loader as L

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    loader = L.create_train_loader(case["beton"], batch_size=case["batch_size"], num_workers=case["workers"],
                                   resolution=case["res"], device="cpu", distributed=world > 1, seed=0,
                                   order=case["order"], os_cache=case["os_cache"])
    build_s = time.perf_counter() - t0
    if world > 1:
        dist.barrier()
    base = RssMonitor.read()
    monitor = RssMonitor()
    monitor.start()
    rates = []
    for epoch in range(case["epochs"]):
        loader.set_epoch(epoch)
        count, first = 0, None
        t0 = time.perf_counter()
        for _, labels in loader:
            if first is None:
                first = time.perf_counter()
                if epoch == 0:
                    first_batch_s = first - t0  # the JIT compilation and the first pages
            else:
                count += labels.shape[0]
        rates.append(count / (time.perf_counter() - first))
    peak = monitor.stop()
    loader.close()
    result = {"rank": rank, "build_s": build_s, "first_batch_s": first_batch_s, "img_s": rates, "base": base,
              "peak": peak}
    Path(case["out"], f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_case(case: dict) -> dict:
    """All ranks of one case (in this fresh process, or spawned from it); their results merged."""
    if not case["warm"]:
        drop_from_page_cache(Path(case["beton"]))
    if case["ranks"] == 1:
        run_rank(0, case)
    else:
        import torch.multiprocessing as tmp
        tmp.spawn(run_rank, args=(case,), nprocs=case["ranks"], join=True)
    ranks = [json.loads(Path(case["out"], f"rank{r}.json").read_text()) for r in range(case["ranks"])]

    def grown(key):
        return max(r["peak"][key] - r["base"][key] for r in ranks)

    later = [statistics.median(r["img_s"][1:]) if len(r["img_s"]) > 1 else float("nan") for r in ranks]
    return {"img_s": sum(r["img_s"][0] for r in ranks), "warm_img_s": sum(later), "anon_mib": grown("RssAnon"), "file_mib": grown("RssFile"),
            "peak_rss_mib": max(r["peak"]["VmRSS"] for r in ranks),
            "build_s": max(r["build_s"] for r in ranks), "first_batch_s": max(r["first_batch_s"] for r in ranks)}


# ------------------------------------------------------------------ driver
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000], help="images per beton (default: 20000)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="gloo ranks (default: 1 2)")
    parser.add_argument("--image-size", type=int, default=32, help="stored images: S x S raw RGB (default 32)")
    parser.add_argument("--res", type=int, default=32, help="random-resized-crop output size (default 32)")
    parser.add_argument("--batch-size", type=int, default=32, help="per rank (default 32: quasi_random keeps "
                                                                    "2 x 32 pages in flight)")
    parser.add_argument("--workers", type=int, default=1, help="FFCV threads per rank (default 1)")
    parser.add_argument("--page-size-mib", type=int, default=2,
                        help="beton page size (default 2: what datasets/write_ffcv.py writes below 1 GiB of pixels)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per case: the first reads from disk, the others "
                                                               "(median) from the page cache or the process's pages")
    parser.add_argument("--warm", action="store_true", help="leave the beton in the page cache between cases")
    parser.add_argument("--work", metavar="DIR", help="write the betons under DIR (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the betons (with --work)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = parser.parse_args(argv)

    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-loader-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs; {args.image_size} px raw images, crop {args.res}, batch {args.batch_size}/rank, "
          f"{args.workers} FFCV thread(s)/rank, {args.page_size_mib} MiB pages, page cache "
          f"{'warm' if args.warm else 'dropped before each case'}", flush=True)
    rows = []
    try:
        for n in args.sizes:
            beton = work / f"noise-{n}-{args.image_size}px.beton"
            if not beton.is_file():
                secs = write_beton(beton, n, args.image_size, args.page_size_mib * MIB, workers=os.cpu_count() or 1)
                print(f"wrote {beton.name}: {n} images, {beton.stat().st_size / MIB:.0f} MiB in {secs:.0f} s", flush=True)
            size_mib = beton.stat().st_size / MIB
            print(f"\n{n} images, beton {size_mib:.0f} MiB ({size_mib / args.page_size_mib:.0f} pages)")
            print(f"{'ranks':>5} {'os_cache':>8} {'order':>12} {'img/s 1st':>9} {'ratio':>6} {'img/s later':>11} "
                  f"{'ratio':>6} {'RssAnon+':>9} {'RssFile+':>9} {'peak RSS':>9} {'build':>6} {'1st batch':>9}")
            print(f"{'':>5} {'':>8} {'':>12} {'epoch':>9} {'':>6} {'epochs':>11} {'':>6} {'MiB/rank':>9} {'MiB/rank':>9} "
                  f"{'MiB/rank':>9} {'s':>6} {'s':>9}")
            for ranks in args.ranks:
                base_rate = base_warm = None
                for os_cache, order in ACCESS:
                    out = Path(tempfile.mkdtemp(prefix="case-", dir=work))
                    case = dict(beton=str(beton), ranks=ranks, epochs=args.epochs, os_cache=os_cache, order=order, res=args.res,
                                batch_size=args.batch_size, workers=args.workers, warm=args.warm, out=str(out),
                                init=str(out / "init"))
                    proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True,
                                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
                    shutil.rmtree(out, ignore_errors=True)
                    if proc.returncode != 0:
                        print(f"case {case} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}", file=sys.stderr)
                        return 1
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    base_rate, base_warm = base_rate or r["img_s"], base_warm or r["warm_img_s"]
                    rows.append(dict(images=n, beton_mib=size_mib, ranks=ranks, os_cache=os_cache, order=order, **r))
                    print(f"{ranks:>5} {str(os_cache).lower():>8} {order:>12} {r['img_s']:>9.0f} "
                          f"{r['img_s'] / base_rate:>5.2f}x {r['warm_img_s']:>11.0f} {r['warm_img_s'] / base_warm:>5.2f}x "
                          f"{r['anon_mib']:>9.0f} {r['file_mib']:>9.0f} {r['peak_rss_mib']:>9.0f} {r['build_s']:>6.1f} "
                          f"{r['first_batch_s']:>9.1f}", flush=True)
        if len(args.sizes) > 1:
            small, big = min(args.sizes), max(args.sizes)
            print(f"\nRSS growth per rank, {big} vs {small} images (anonymous + file pages):")
            for ranks in args.ranks:
                for os_cache, order in ACCESS:
                    a, b = ([r for r in rows if r["images"] == n and r["ranks"] == ranks and r["os_cache"] == os_cache
                             and r["order"] == order][0] for n in (small, big))
                    ratio = (b["anon_mib"] + b["file_mib"]) / max(1.0, a["anon_mib"] + a["file_mib"])
                    print(f"  {ranks} rank(s) os_cache={str(os_cache).lower():5} {order:12}: "
                          f"{a['anon_mib'] + a['file_mib']:6.0f} -> {b['anon_mib'] + b['file_mib']:6.0f} MiB "
                          f"({ratio:.1f}x)")
    finally:
        if not args.keep:
            if args.work:
                for n in args.sizes:
                    (work / f"noise-{n}-{args.image_size}px.beton").unlink(missing_ok=True)
            else:
                shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
