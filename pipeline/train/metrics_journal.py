"""Exactly-once metric logging across kills, resumes and re-evaluations (rank 0).

Every metrics call of a run gets a key (``epoch 3``, ``model/params``...) and is written to
``<run_dir>/metrics_journal.jsonl`` (fsync'ed) with its step and timestamp before it is sent.
When a later process of the same run (``--resume auto`` after a kill, a re-evaluation of a
finished run) logs a key the journal already holds, it sends the journaled call again, same
values and same timestamp, and MLflow's store ignores a metric it already has (same key,
step, timestamp and value): whether or not the first process got to send it, the run ends up
with it exactly once. The trainer logs an epoch only after that epoch's checkpoint is on
disk, and replays the checkpoint's own epoch at resume (a kill between the save and the log).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Mapping

from pipeline.tracking.journal import append_jsonl, read_jsonl

JOURNAL = "metrics_journal.jsonl"


class MetricsJournal:
    """Logs each key's metrics once through `tracker` (a pipeline.tracking.tracker Tracker or NullTracker).
    Disabled (`enabled=False`, ranks other than 0): calls pass straight to the tracker."""

    def __init__(self, run_dir: str | Path, tracker, enabled: bool = True):
        self.path = Path(run_dir) / JOURNAL
        self.tracker, self.enabled = tracker, enabled
        self.entries: dict[str, dict] = {}
        self._torn_tail = False  # a kill mid-append left a line without its newline
        if enabled:
            for entry in _read_entries(self.path):
                self.entries.setdefault(entry["key"], entry)
            self._torn_tail = _ends_without_newline(self.path)

    def log(self, key: str, metrics: Mapping[str, float], step: int) -> None:
        """Log `metrics` at `step` under `key`; a key journaled before is sent as it was then."""
        if not self.enabled:
            self.tracker.log_metrics(metrics, step=step)
            return
        entry = self.entries.get(key)
        if entry is None and not metrics:
            return
        if entry is None:
            entry = {"key": key, "step": int(step), "ts": int(time.time() * 1000),
                     "metrics": {name: float(value) for name, value in metrics.items()}}
            append_jsonl(self.path, [entry], after_torn_line=self._torn_tail)
            self._torn_tail = False
            self.entries[key] = entry
        self.tracker.log_metrics(entry["metrics"], step=entry["step"], timestamp_ms=entry["ts"])

    def __contains__(self, key: str) -> bool:
        return key in self.entries


def _read_entries(path: Path) -> list[dict]:
    """The journal's whole entries (a line torn by a kill mid-append is skipped: that call was never sent)."""
    return [entry for entry in read_jsonl(path)
            if isinstance(entry, dict) and {"key", "step", "ts", "metrics"} <= entry.keys()]


def _ends_without_newline(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            if handle.seek(0, os.SEEK_END) == 0:
                return False
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"
    except FileNotFoundError:
        return False
