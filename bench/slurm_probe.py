"""Worker entry for bench/slurm_scale.sh: the real ``pipeline.train.entry.main``, with timestamps of each rank
(and ``summarize``, the script's report).

``python pipeline/launch.py ... --entry bench.slurm_probe:timed_train`` runs training unchanged and
writes ``<output_dir>/probe/rank<R>-restart<N>.json`` per rank and attempt: when its process started,
when the task called the entry, when the process group was up (every rank leaves that rendezvous
together), and when its first forward pass and first optimiser step ran (torch's global hooks).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


def _process_start() -> float:
    """This process's start (epoch seconds), from /proc: before Python and torch were imported."""
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    btime = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
    return btime + start / ticks


def timed_train(argv: list[str]) -> int:
    import torch
    import yaml
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from pipeline.train import entry as train
    from pipeline.train import dist as dist_util

    marks = {"process_start": _process_start(), "entry": time.time()}

    def mark(name):
        def hook(*_args, **_kwargs):
            marks.setdefault(name, time.time())
        return hook

    forward_hook = torch.nn.modules.module.register_module_forward_pre_hook(mark("first_forward"))
    step_hook = register_optimizer_step_post_hook(mark("first_step"))
    init = dist_util.init_distributed_mode

    def timed_init(*args, **kwargs):
        info = init(*args, **kwargs)
        marks["process_group"] = time.time()
        return info

    dist_util.init_distributed_mode = timed_init
    try:
        rc = train.main(argv)
    finally:
        forward_hook.remove()
        step_hook.remove()
        dist_util.init_distributed_mode = init
        marks["end"] = time.time()
        out = Path(yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())["output_dir"]) / "probe"
        out.mkdir(parents=True, exist_ok=True)
        rank, restart = os.environ.get("SLURM_PROCID", "0"), os.environ.get("SLURM_RESTART_COUNT", "0")
        marks.update(rank=int(rank), restart=int(restart), host=socket.gethostname(),
                     master_port=os.environ.get("MASTER_PORT"))
        (out / f"rank{rank}-restart{restart}.json").write_text(json.dumps(marks))
    return rc


# ------------------------------------------------------------------ bench/slurm_scale.sh's report


def _spread(values: list[float]) -> float:
    return max(values) - min(values)


def summarize(work: Path, ranks: int, job_ids: dict[str, str]) -> bool:
    """Print the figures of a slurm_scale.sh run kept in ``work``; True if B resumed exactly."""
    import re
    import sqlite3
    import statistics

    import torch

    def probes(name: str, restart: int) -> list[dict]:
        got = [json.loads(p.read_text()) for p in (work / f"{name}-run" / "probe").glob(f"rank*-restart{restart}.json")]
        if len(got) != ranks:
            raise SystemExit(f"{name} attempt {restart}: {len(got)} of {ranks} ranks left a probe")
        return got

    def stages(p: list[dict], t0: float, what: str) -> None:
        print(f"  {what}: seconds after it, first rank .. last rank (spread)")
        for key, label in (("process_start", "task processes started"), ("entry", "Python + torch imported"),
                           ("process_group", "process group up"), ("first_forward", "1st batch decoded+forward"),
                           ("first_step", "first optimiser step")):
            v = [r[key] - t0 for r in p]
            print(f"    {label:26} {min(v):7.1f} .. {max(v):7.1f}  ({_spread(v):5.1f})")

    for name in ("A", "B"):
        p = probes(name, 0)
        stages(p, float((work / f"{name}.submitted").read_text()), f"{name} ({len(p)} ranks on "
               f"{len({r['host'] for r in p})} nodes, MASTER_PORT {sorted({r['master_port'] for r in p})}): submitted")
        logs = list((work / f"{name}-run" / "slurm" / job_ids[name]).glob("*_log.*"))
        sizes = sorted(f.stat().st_size for f in logs)
        print(f"    logs: {len(logs)} files, {sum(sizes) / 1024:.0f} KiB (largest {sizes[-1] / 1024:.0f} KiB, "
              f"median {statistics.median(sizes) / 1024:.1f} KiB)")
        db = sqlite3.connect(work / f"{name}-runs" / "mlflow.db")
        print(f"    MLflow (rank 0 only): {db.execute('select count(*) from metrics').fetchone()[0]} metric rows, "
              f"{db.execute('select count(*) from params').fetchone()[0]} params")
        db.close()
    stages(probes("B", 1), float((work / "B.signalled").read_text()), "B's requeued attempt: USR2 sent")
    out = (work / "B.log").read_text(errors="replace")
    m = re.search(r"resumed from \S+: epoch (\d+) step (\d+)", out)
    print(f"B resumed at epoch {m.group(1)} step {m.group(2)}" if m else "B: no 'resumed from' line")
    wa = torch.load(work / "A-run" / "final_weights.pt", map_location="cpu", weights_only=False)
    wb = torch.load(work / "B-run" / "final_weights.pt", map_location="cpu", weights_only=False)
    same = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    print(f"final weights of B (preempted, requeued, resumed) equal A's (undisturbed) bit for bit: {same} "
          f"({len(wa)} tensors)")
    return bool(same and m)


if __name__ == "__main__":
    import sys

    # python -m bench.slurm_probe WORKDIR RANKS JOB_A JOB_B
    sys.exit(0 if summarize(Path(sys.argv[1]), int(sys.argv[2]), {"A": sys.argv[3], "B": sys.argv[4]}) else 1)
