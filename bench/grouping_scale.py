"""Grouping at scale: time and peak memory of ``ssal_models.grouping.group_classes`` for
C = 1000, 4000 and 21,841 classes (ImageNet-21k), k = C/5, both variants, side by side with the
dense implementations it replaced (tests/grouping_reference.py) where those finish.

    .venv/bin/python bench/grouping_scale.py                      # C = 1000 4000 21841
    .venv/bin/python bench/grouping_scale.py --sizes 1000 4000 --variants paper
    .venv/bin/python bench/grouping_scale.py --criteria join split   # split: most pairs tie at 0

Input: a hold-out-like hard-count confusion -- every class gets Poisson(10) errors on random
other classes plus 40 correct predictions (Poisson counts + diagonal, ~10 non-zeros per row).
The new code gets it as a scipy.sparse matrix at 21,841 classes (a dense float64 copy alone
would be 3.8 GB) and, like the reference, as a dense float64 array below.  Each run is a fresh
subprocess, so its peak RSS (``ru_maxrss``, input included) is its own; "RSS in" is the RSS
before the call (imports and input).  Times are wall clock and the process's CPU time (this box
is shared: wall time carries the neighbours' load, CPU time the work).  Where both ran, the
partitions are compared.

Target (issue 17): 21,841 classes in <= 60 s and <= 8 GB RSS.  The reference is skipped where it
would take hours (paper: above 4000 classes, ~C^3.8; authors: above 1000, a literal
step-by-step statement of the authors' loop).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_LIMIT = {"paper": 4000, "authors": 1000}


def confusion(num_classes: int, dense: bool):
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(num_classes)
    errors = rng.poisson(10, num_classes)
    rows = np.repeat(np.arange(num_classes), errors)
    cols = (rows + rng.integers(1, num_classes, rows.size)) % num_classes  # never the true class
    counts = sp.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(num_classes, num_classes)).tocsr()
    counts = counts + sp.identity(num_classes, format="csr") * 40
    return counts.toarray() if dense else counts.tocsr()


def one(num_classes: int, implementation: str, variant: str, criterion: str, out: str) -> None:
    """Run one grouping in this process; write its figures (and the grouping) as JSON."""
    import numpy as np

    if implementation == "new":
        from ssal_models.grouping import group_classes as fn
    else:
        from tests import grouping_reference as ref
        fn = ref.reference_group_classes if variant == "paper" else ref.reference_authors_group_classes
    matrix = confusion(num_classes, dense=implementation == "reference" or num_classes <= 4000)
    input_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    k = num_classes // 5
    wall, cpu = time.perf_counter(), time.process_time()
    if implementation == "new":
        grouping = fn(matrix, k, criterion, seed=0, variant=variant)
    else:
        grouping = fn(matrix, k, criterion, 0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    sizes = np.bincount(grouping)
    Path(out).write_text(json.dumps({"wall": wall, "cpu": cpu, "peak_gib": peak, "input_gib": input_rss,
                                     "k": k, "sizes": [int(sizes.min()), int(sizes.max())],
                                     "grouping": grouping.tolist()}))


def spawn(num_classes: int, implementation: str, variant: str, criterion: str, timeout: float) -> dict | None:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        # as a module from the repository root: the reference code is tests/grouping_reference.py
        cmd = [sys.executable, "-m", "bench.grouping_scale", "--one", str(num_classes), implementation, variant,
               criterion, out.name]
        try:
            subprocess.run(cmd, check=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"timeout": timeout}
        return json.loads(Path(out.name).read_text())


def same_partition(a, b) -> bool:
    pairs = set(zip(a, b))
    return len(pairs) == len(set(a)) == len(set(b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 21841])
    parser.add_argument("--variants", nargs="+", choices=("paper", "authors"), default=["paper", "authors"])
    parser.add_argument("--criteria", nargs="+", choices=("join", "split"), default=["join"],
                        help="join (the papers' groupings; default) and/or split")
    parser.add_argument("--timeout", type=float, default=3600, help="per run, seconds (default: %(default)s)")
    parser.add_argument("--one", nargs=5, metavar=("C", "IMPL", "VARIANT", "CRITERION", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        one(int(args.one[0]), *args.one[1:])
        return 0
    print(f"{'variant':8} {'crit.':5} {'C':>6} {'k':>5}  {'impl':9} {'wall s':>8} {'cpu s':>8} {'peak GiB':>9} "
          f"{'RSS in GiB':>10}  sizes   same partition / speed-up (cpu)")
    for variant, criterion in [(v, c) for c in args.criteria for v in args.variants]:
        for num_classes in args.sizes:
            new = spawn(num_classes, "new", variant, criterion, args.timeout)
            ref = spawn(num_classes, "reference", variant, criterion, args.timeout) \
                if num_classes <= REFERENCE_LIMIT[variant] else None
            for name, r in (("new", new), ("reference", ref)):
                head = f"{variant:8} {criterion:5} {num_classes:>6} {num_classes // 5:>5}  {name:9}"
                if r is None:
                    print(f"{head} {'not run (hours at this size)':>36}")
                    continue
                if "timeout" in r:
                    print(f"{head} {'timed out':>8}")
                    continue
                note = ""
                if name == "reference" and new and "grouping" in new:
                    note = (f"{'yes' if new['grouping'] == r['grouping'] else 'NO'} "
                            f"(renamed-equal: {same_partition(new['grouping'], r['grouping'])}); "
                            f"{r['cpu'] / max(new['cpu'], 1e-9):.0f}x")
                print(f"{head} {r['wall']:8.1f} {r['cpu']:8.1f} "
                      f"{r['peak_gib']:9.2f} {r['input_gib']:10.2f}  {r['sizes'][0]}..{r['sizes'][1]:<4} {note}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
