"""``python pipeline/report.py ...``: a study's table and chart.

The code lives in :mod:`pipeline.stages.report`; this file keeps the users' script path."""
from pipeline.stages.report import main

if __name__ == "__main__":
    raise SystemExit(main())
