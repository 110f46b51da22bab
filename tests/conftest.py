"""Shared pytest fixtures. Helpers add fixtures here with small appends; keep each one documented."""
import os

# Tests run on a 2-core box: keep every process to few threads unless a test says otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
