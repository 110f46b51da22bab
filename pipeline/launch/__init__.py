"""The launchers: ``cli`` (``python pipeline/launch.py``: ``--local``, torchrun-style local workers, or SLURM),
``slurm`` (profiles, the submitit executor, the one submit path and job following that launch and studies
share), ``arrays`` (``--array`` expansion), ``task`` (what a SLURM task runs: the worker entry, with
requeue on preemption), ``study`` (multi-stage studies: baseline -> groups -> SSAL -> report).
May import ``pipeline.tracking`` and the worker's plumbing in ``pipeline.train`` (``config``/``schema`` to
check a config, a profile, a study before submitting; ``checkpoint``, ``run_lock``, ``preemption`` for resume
and requeue), not its loops; it starts the stages as commands, never imports them. Nothing imports
``launch``.
"""
