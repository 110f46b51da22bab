"""The training pipeline, in four rooms (docs/ARCHITECTURE.md draws them):

- ``pipeline.train``    the worker: one training run, on one process, under torchrun or in a SLURM task.
- ``pipeline.launch``   the launchers: ``launch.py`` (local / torchrun / SLURM), job arrays, studies.
- ``pipeline.tracking`` MLflow: the fault-tolerant tracker, its sync CLI, run lookups, figures.
- ``pipeline.stages``   post-hoc tools on trained runs: groups, fit_lc (+LC), explain (CAMs), report.

Imports point one way: ``stages -> train, tracking``; ``launch -> train (its plumbing), tracking``;
``train -> tracking``; ``tracking`` imports none of them; nothing imports ``launch`` (tests/test_architecture.py).
The ``*.py`` files beside the rooms are the users' script paths (``python pipeline/launch.py``, ...);
each only calls its room's ``main``.
"""
