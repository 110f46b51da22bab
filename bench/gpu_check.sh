#!/usr/bin/env bash
# The whole GPU path in one command (see bench/gpu_check.py for the stages and exit codes):
#   bench/gpu_check.sh [OUT_DIR] [--gpus N] [--budget SECONDS] [--skip STAGE ...]
# writes OUT_DIR/gpu_check.json (+ gpu_check.log, gpu_tests.xml, each benchmark's JSON); OUT_DIR
# defaults to $OUT, else ./gpu_check_out. On a machine without CUDA it says so in one line and exits 2.
# Python: $PYTHON if set, else the repo's .venv, else python3.
# A .device/ folder (bash bench/device_bundle.sh) holds Python 3.12 wheels for a machine without
# network whose python lacks ffcv / mlflow / submitit: they are installed into a temporary folder first.
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
export PYTHONUNBUFFERED=1
exec "$python" bench/gpu_check.py "$@"
