"""``python -m pipeline.train``: the worker entry (see :mod:`pipeline.train.entry`)."""
from pipeline.train.entry import main

raise SystemExit(main())
