"""The launchers: ``cli`` (``python pipeline/launch.py``: ``--local`` in this process or as torchrun-style
workers through ``local_workers``, or SLURM), ``slurm`` (profiles, the submitit executor, the one submit path
and job following that launch and studies share), ``arrays`` (``--array`` expansion), ``task`` (what a SLURM
task runs: the worker entry, with requeue on preemption), ``study`` (a study file: the stages of baseline ->
groups -> SSAL -> report, read and checked) and ``study_jobs`` (running one: here, or as SLURM jobs chained
by afterok), ``recipe_card`` (what ``--dry-run`` prints: global batch, peak lr, steps per epoch, estimated
GPU-hours, computed from the config; it builds the model on the meta device through ``pipeline.train.factory``
to count its multiply-adds). May import ``pipeline.tracking`` and the worker's plumbing in ``pipeline.train`` (``config``/
``schema`` to check a config, a profile, a study before submitting; ``checkpoint``, ``run_lock``,
``preemption``, ``exit_codes`` for resume and requeue), not its loops; it starts the stages as commands,
never imports them. Nothing imports ``launch``.
"""
