#!/usr/bin/env bash
# Order-independence check (not part of `make test`): run each test file alone, in a fresh pytest process,
# on a machine whose SLURM is purged before the file starts, so no file can pass only because another one
# (the SLURM fixture) installed something first. Needs root (apt-get purge) and `make venv`.
#   bash tests/each_file_alone.sh [OUT_DIR] [tests/test_x.py ...]   (default: every tests/test_*.py)
# One line per file in OUT_DIR/summary.txt: rc, seconds, what was purged, pytest's last line.
set -u
cd "$(dirname "$0")/.."
out=${1:-/tmp/each_file_alone}
shift || true
mkdir -p "$out"
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(tests/test_*.py)
for f in "${files[@]}"; do
  pkgs=$(dpkg -l 2>/dev/null | awk '$1 ~ /^(ii|rc)$/ && $2 ~ /slurm|munge/ {print $2}' | xargs)
  if [ -n "$pkgs" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq $pkgs >/dev/null 2>&1 || { echo "apt-get purge $pkgs failed" >&2; exit 1; }
  fi
  left=$(command -v srun sbatch slurmctld slurmd munged | xargs)
  log="$out/$(basename "$f" .py).log"
  start=$(date +%s)
  .venv/bin/python -m pytest "$f" -q -ra > "$log" 2>&1
  rc=$?
  echo "$f rc=$rc $(( $(date +%s) - start ))s purged=[$pkgs] slurm_on_path=[$left] | $(grep -E '(passed|failed|error)' "$log" | tail -1)" \
    | tee -a "$out/summary.txt"
done
