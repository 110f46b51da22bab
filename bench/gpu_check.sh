#!/usr/bin/env bash
# The whole GPU path in one command (see bench/gpu_check.py for the stages and exit codes):
#   bench/gpu_check.sh [OUT_DIR] [--gpus N] [--budget SECONDS] [--skip STAGE ...]
# writes OUT_DIR/gpu_check.json (+ gpu_check.log, gpu_tests.xml, each benchmark's JSON); OUT_DIR
# defaults to $OUT, else ./gpu_check_out. On a machine without CUDA it says so in one line and exits 2.
# Python: $PYTHON if set, else the repo's .venv, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$python" bench/gpu_check.py "$@"
