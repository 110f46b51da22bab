"""``python pipeline/explain.py ...``: CAMs of a run's heads.

The code lives in :mod:`pipeline.stages.explain`; this file keeps the users' script path."""
from pipeline.stages.explain import main

if __name__ == "__main__":
    raise SystemExit(main())
