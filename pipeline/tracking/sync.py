"""``python -m pipeline.tracking sync RUN_DIR [--uri URI]``: send a run folder's journaled tracking calls
(kept while the server was away, or refused by it) to the store; nothing is lost if it is still away."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Iterable

from pipeline.tracking import credentials
from pipeline.tracking.journal import BUFFER_FILE, REJECTED_FILE, append_jsonl, read_jsonl, read_state
from pipeline.tracking.tracker import Tracker


def sync_run_dir(run_dir: str, uri: str | None = None, **tracker_kwargs) -> str | None:
    """Replay ``run_dir/tracking_buffer.jsonl`` into the run it belongs to (or a new run when it
    was never created), then terminate it with the recorded status. Returns the run id, or
    ``None`` if calls are still pending (server still unreachable)."""
    state = read_state(run_dir)
    rejected = os.path.join(run_dir, REJECTED_FILE)
    if os.path.exists(rejected):  # refused before: queue them again (those refused again come back here)
        ops = [{k: v for k, v in op.items() if k != "rejected"} for op in read_jsonl(rejected)]
        append_jsonl(os.path.join(run_dir, BUFFER_FILE), ops)
        os.remove(rejected)
    target = uri or state["uri"]
    same_store = target == state["uri"]
    tracker = Tracker(target, state["experiment"], run_dir, **tracker_kwargs)
    tags = dict(state.get("tags") or {})
    tags["tracking.synced_from_buffer"] = "true"
    tracker.start(state.get("run_name") or os.path.basename(run_dir), state.get("params") or {}, tags,
                  run_id=state.get("run_id") if same_store else None)
    tracker.end(state.get("status") or "FINISHED")
    return None if tracker.unsent else tracker.run_id


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking",
                                     epilog="more: docs/tracking.md, docs/reliability.md (no tracking call is lost)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sync_parser = sub.add_parser("sync", help="send a run directory's buffered tracking calls to the server")
    sync_parser.add_argument("run_dir")
    sync_parser.add_argument("--uri", default=None, help="tracking URI (default: the one the run used)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.cmd == "sync":
        if not any(os.path.exists(os.path.join(args.run_dir, f)) for f in (BUFFER_FILE, REJECTED_FILE)):
            print(f"nothing to sync: no {BUFFER_FILE} or {REJECTED_FILE} in {args.run_dir}")
            return 0
        try:
            if args.uri:
                credentials.check_uri(args.uri, "--uri")
            credentials.check_server_accepts(args.uri or read_state(args.run_dir)["uri"])
        except (credentials.CredentialsError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        run_id = sync_run_dir(args.run_dir, args.uri)
        if run_id is None:
            print("tracking server still unreachable; nothing lost, try again later", file=sys.stderr)
            return 1
        still = len(read_jsonl(os.path.join(args.run_dir, REJECTED_FILE)))
        if still:
            print(f"synced into run {run_id}; {still} call(s) refused again, kept in "
                  f"{os.path.join(args.run_dir, REJECTED_FILE)}", file=sys.stderr)
            return 1
        print(f"synced into run {run_id}")
    return 0
