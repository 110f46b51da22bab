"""``python pipeline/fit_lc.py ...``: SSAL's +LC head on a frozen run.

The code lives in :mod:`pipeline.stages.fit_lc`; this file keeps the users' script path."""
from pipeline.stages.fit_lc import main

if __name__ == "__main__":
    raise SystemExit(main())
