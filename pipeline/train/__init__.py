"""The worker: one training run (``python -m pipeline.train``; torchrun and the SLURM task run the same).

``entry`` parses the command line, sets the process up (``dist``, ``preemption``'s signal handlers,
``run_lock`` on the run folder) and runs a ``trainer.Trainer``, which composes the ``config`` (read through
``schema``: the one dataclass mechanism for every YAML file a user writes, SLURM profiles and study files
too), the model built by ``factory`` (what the post-hoc stages import too), the FFCV loaders (read order
from ``data_access``), the method-agnostic loops of ``engine`` (``maxl_training`` for MAXL's two-optimizer
step), ``optim``, ``checkpoint`` (``checkpoint_clock``: the time-based mid-epoch saves), the hang ``watchdog``,
the metrics journal (``metrics_journal``: each epoch's metrics sent once across resumes) and the run's tracker;
``model_export`` saves the final model as an MLflow model; ``exit_codes`` lists what the commands return;
``restarts`` decides whether a failed run starts again (for the launchers) and logs its restarts. May import:
``ssal_models``, ``ssal_datasets``, ``pipeline.tracking``; never ``launch`` or ``stages``.
"""
