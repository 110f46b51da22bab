"""``python pipeline/launch.py ...``: launch training locally, under torchrun-style workers or on SLURM; studies.

The code lives in :mod:`pipeline.launch.cli`; this file keeps the users' script path."""
from pipeline.launch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
