"""MLflow plumbing: ``tracker`` (a fault-tolerant tracker that journals to the run folder while the
server is away), ``store`` (the default SQLite store, experiments, MLflow's limits, the UI links we
print), ``journal`` (the run folder's files for unsent calls and the fallback store),
``sync`` (``python -m pipeline.tracking sync RUN_DIR`` replays a journal), ``runs`` (finding runs and their
files), ``credentials`` (none in a URI; a server that refuses the environment's is one line at start),
``models`` (a saved MLflow model logged to its run, the Model Registry), ``plots`` (the figures a run logs)
and ``constants`` (file names shared by everyone).
Imports nothing else of the pipeline.
"""
