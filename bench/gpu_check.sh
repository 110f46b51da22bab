#!/usr/bin/env bash
# The GPU path in two calls of <= 5 minutes (see bench/gpu_check.py for the stages and exit codes):
#   bench/gpu_check.sh [OUT_DIR] [--part 1|2|all] [--gpus N] [--budget SECONDS] [--skip STAGE ...]
# part 1 first when only one call is possible; writes OUT_DIR/gpu_check_part<N>.json (gpu_check.json
# without --part; + the .log, the gpu tests' JUnit XML, each benchmark's JSON); OUT_DIR
# defaults to $OUT, else ./gpu_check_out. On a machine without CUDA it says so in one line and exits 2.
# Python: $PYTHON if set, else the repo's .venv, else python3.
# A .device/ folder (bash bench/device_bundle.sh) holds Python 3.12 wheels for a machine without
# network whose python lacks ffcv / mlflow / submitit: they are installed into a temporary folder first.
# The project itself needs no install there: its packages are put on PYTHONPATH (below).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
if [ -d .device ] && ! "$python" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(p) is None for p in ("ffcv", "mlflow", "submitit")))' 2>/dev/null; then
    "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
        || { echo "gpu_check: .device/ holds Python 3.12 wheels, $python is $("$python" -V 2>&1): set PYTHON="; exit 2; }
    site="${TMPDIR:-/tmp}/ssal-device-site"
    "$python" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" .device/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: installed .device/'s $(ls .device/*.whl | wc -l) wheels into $site"
fi
# The project's packages: `make` installs this checkout editable (pip install -e .). Where the python
# does not import them from here (the GPU machine gets a bare copy of the tree), they go on PYTHONPATH
# as the install maps them: the root for pipeline/ and ssal_models/, datasets/ as ssal_datasets.
case "$python" in /*) ;; */*) python="$PWD/$python" ;; esac
repo=$PWD
if ! (cd / && "$python" - "$repo" 2>/dev/null <<'PY'
import importlib.util, os, sys
root = os.path.realpath(sys.argv[1])
for name, folder in (("pipeline", "pipeline"), ("ssal_models", "ssal_models"), ("ssal_datasets", "datasets")):
    spec = importlib.util.find_spec(name)
    if spec is None or os.path.realpath(os.path.dirname(spec.origin)) != os.path.join(root, folder):
        sys.exit(1)
PY
); then
    links="${TMPDIR:-/tmp}/ssal-packages-$(printf %s "$repo" | cksum | cut -d' ' -f1)"  # one per checkout
    mkdir -p "$links" && ln -sfn "$repo/datasets" "$links/ssal_datasets"
    export PYTHONPATH="$repo:$links${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$python" bench/gpu_check.py "$@"
