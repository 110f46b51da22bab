"""``python -m pipeline.tracking sync RUN_DIR [--uri URI]``: send a run folder's journaled tracking calls
(kept while the server was away, or refused by it) to the store; nothing is lost if it is still away."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Iterable


# --------------------------------------------------------------------------------------------
# sync CLI: push a run_dir's unsent calls to the tracking server
# --------------------------------------------------------------------------------------------
def sync_run_dir(run_dir: str, uri: str | None = None, **tracker_kwargs) -> str | None:
    """Replay ``run_dir/tracking_buffer.jsonl`` into the run it belongs to (or a new run when it
    was never created), then terminate it with the recorded status. Returns the run id, or
    ``None`` if calls are still pending (server still unreachable)."""
    with open(os.path.join(run_dir, STATE_FILE)) as f:
        state = json.load(f)
    rejected = os.path.join(run_dir, REJECTED_FILE)
    if os.path.exists(rejected):  # refused before: queue them again (those refused again come back here)
        ops = [{k: v for k, v in op.items() if k != "rejected"} for op in read_jsonl(rejected)]
        with open(os.path.join(run_dir, BUFFER_FILE), "a") as f:
            f.write("".join(json.dumps(op) + "\n" for op in ops))
            f.flush()
            os.fsync(f.fileno())
        os.remove(rejected)
    target = uri or state["uri"]
    same_store = target == state["uri"]
    t = Tracker(target, state["experiment"], run_dir, **tracker_kwargs)
    tags = dict(state.get("tags") or {})
    tags["tracking.synced_from_buffer"] = "true"
    t.start(state.get("run_name") or os.path.basename(run_dir), state.get("params") or {}, tags,
            run_id=state.get("run_id") if same_store else None)
    t.end(state.get("status") or "FINISHED")
    return None if t._pending else t.run_id

from pipeline.tracking.tracker import BUFFER_FILE, REJECTED_FILE, STATE_FILE, Tracker, read_jsonl



def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.tracking")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sync", help="send a run directory's buffered tracking calls to the server")
    s.add_argument("run_dir")
    s.add_argument("--uri", default=None, help="tracking URI (default: the one the run used)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.cmd == "sync":
        if not any(os.path.exists(os.path.join(args.run_dir, f)) for f in (BUFFER_FILE, REJECTED_FILE)):
            print(f"nothing to sync: no {BUFFER_FILE} or {REJECTED_FILE} in {args.run_dir}")
            return 0
        rid = sync_run_dir(args.run_dir, args.uri)
        if rid is None:
            print("tracking server still unreachable; nothing lost, try again later", file=sys.stderr)
            return 1
        still = len(read_jsonl(os.path.join(args.run_dir, REJECTED_FILE)))
        if still:
            print(f"synced into run {rid}; {still} call(s) refused again, kept in "
                  f"{os.path.join(args.run_dir, REJECTED_FILE)}", file=sys.stderr)
            return 1
        print(f"synced into run {rid}")
    return 0
