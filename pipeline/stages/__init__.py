"""Post-hoc stages on trained runs: ``groups`` (class groupings from a confusion matrix), ``fit_lc``
(SSAL's +LC head on a frozen model), ``explain`` (CAMs), ``report`` (a study's table and chart).
Each is a CLI (``python pipeline/groups.py ...``) and a study stage kind; ``common`` holds what they
share (MLflow options, run lookup, the trained model). May import ``pipeline.train`` (``factory``,
``config``, ``schema``, ``engine`` for fit_lc's loop, ``exit_codes``) and ``pipeline.tracking``; never
``launch``.
"""
