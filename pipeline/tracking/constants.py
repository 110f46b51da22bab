"""Names shared by the worker, the launchers and the tools (each fact once)."""

#: File in a run folder that names the run's MLflow run id: the engine resumes that run, the launcher
#: creates it before submitting, the tools find a run from its folder.
RUN_ID_FILE = "mlflow_run_id"
