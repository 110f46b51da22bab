"""The worker: one training run (``python -m pipeline.train``; torchrun and the SLURM task run the same).

``entry`` parses the command line and runs a ``trainer.Trainer``, which composes the ``config`` (read
through ``schema``: the one dataclass mechanism for every YAML file a user writes, SLURM profiles and
study files too), the model and loaders built by ``factory`` (what the post-hoc stages import too), the method-agnostic loops
of ``engine`` (``maxl_training`` for MAXL's two-optimizer step), ``optim``, ``checkpoint``, ``dist``,
``preemption`` and the run's ``tracking`` tracker. May import: ``ssal_models``, ``ssal_datasets``,
``pipeline.tracking``; never ``launch`` or ``stages``.
"""
