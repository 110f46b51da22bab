"""``python pipeline/groups.py ...``: class groupings from a trained run's confusion matrix.

The code lives in :mod:`pipeline.stages.groups`; this file keeps the users' script path."""
from pipeline.stages.groups import main

if __name__ == "__main__":
    raise SystemExit(main())
