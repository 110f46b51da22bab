"""``python pipeline/study.py ...``: a study's plan and state.

The code lives in :mod:`pipeline.launch.study_jobs`; this file keeps the users' script path."""
from pipeline.launch.study_jobs import main

if __name__ == "__main__":
    raise SystemExit(main())
