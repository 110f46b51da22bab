"""``python -m pipeline.tracking sync RUN_DIR``: see :mod:`pipeline.tracking.sync`."""
from pipeline.tracking.sync import main

raise SystemExit(main())
