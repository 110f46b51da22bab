"""MLflow plumbing: ``tracker`` (a fault-tolerant tracker that journals to the run folder while the
server is away), ``python -m pipeline.tracking sync RUN_DIR`` (replays a journal), ``runs`` (finding
runs and their files), ``plots`` (the figures a run logs) and ``constants`` (file names and URIs
shared by everyone). Imports nothing else of the pipeline.
"""
