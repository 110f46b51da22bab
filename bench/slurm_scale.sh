#!/bin/bash
# bench/slurm_scale.sh — 16 ranks on the real SLURM test cluster: 8 nodes x 2 tasks (gloo on CPU).
#
#   sudo bench/slurm_scale.sh [WORKDIR]          (on a shared box: flock /tmp/ssal-slurm.lock bench/slurm_scale.sh)
#
# Starts slurm/testcluster.sh with NODES nodes, writes a small demo set, and submits the demo config with
# `pipeline/launch.py --cluster testcluster --partition gpu --nodes NODES --gpus-per-node TASKS` twice, one
# after the other, for EPOCHS epochs:
#   A  undisturbed (the reference);
#   B  `scancel --signal=USR2` once its epoch-1 checkpoint exists -> checkpoint, requeue, exact resume.
# It prints submit-to-first-step time, per-rank start skew (process start, process group up, first step),
# the requeue's turnaround, log volume, MLflow metric rows, and whether B's final weights equal A's bit for
# bit. Every rank runs bench/slurm_probe.py's entry (pipeline.train.entry.main plus timestamps). WORKDIR (default:
# a new temporary folder) is removed at the end unless KEEP=1; the cluster is always taken down.
#
# Environment: NODES=8 TASKS=2 (tasks per node = fake GPUs per node) EPOCHS=2 IMAGES_PER_CLASS=24 (16 classes)
#              BATCH=2 (per rank; 16 ranks x 2 = 32 images a step, 12 steps an epoch) MAX_STEPS=0 (cap per epoch,
#              0 = none) KEEP=0
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
NODES=${NODES:-8}; TASKS=${TASKS:-2}; EPOCHS=${EPOCHS:-2}; IMAGES_PER_CLASS=${IMAGES_PER_CLASS:-24}
BATCH=${BATCH:-2}; MAX_STEPS=${MAX_STEPS:-0}; KEEP=${KEEP:-0}
W=${1:-$(mktemp -d /tmp/slurm-scale-XXXXXX)}
mkdir -p "$W"; W=$(cd "$W" && pwd)
[ "$(id -u)" = 0 ] || { echo "slurm_scale: needs root (the test cluster)" >&2; exit 2; }
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }

CL=$W/cluster
cleanup() {
  NODES=$NODES bash "$REPO/slurm/testcluster.sh" down "$CL" >/dev/null 2>&1 || true
  [ "$KEEP" = 1 ] && echo "kept $W" || rm -rf "$W"
}
trap cleanup EXIT

t=$(now)
NODES=$NODES CPUS=$((3 * TASKS)) GPUS=$TASKS MEM_MB=4000 NS_PREFIX=scl CTL_PORT=$(free_port) DBD_PORT=$(free_port) \
  bash "$REPO/slurm/testcluster.sh" up "$CL" >"$W/cluster-up.log" 2>&1 || { cat "$W/cluster-up.log"; exit 1; }
# shellcheck disable=SC1091
. "$CL/env.sh"
echo "cluster: $NODES nodes x $TASKS tasks up in $(printf %.1f "$(echo "$(now) - $t" | bc)") s"

"$PY" "$REPO/datasets/write_ffcv.py" demo --out "$W/data" --num-classes 16 --num-superclasses 4 \
  --images-per-class "$IMAGES_PER_CLASS" --val-images-per-class 4 --image-size 32 --workers 2 >"$W/data.log" 2>&1

RANKS=$((NODES * TASKS))
job() {  # job NAME: launch.py --wait in the background; its output in $W/NAME.log
  local name=$1
  now >"$W/$name.submitted"
  (cd "$REPO" && exec "$PY" pipeline/launch.py --cluster testcluster --partition gpu --nodes "$NODES" \
      --gpus-per-node "$TASKS" --time 01:00:00 --entry bench.slurm_probe:timed_train --wait \
      --output-dir "$W/$name-run" --config configs/demo.yaml data.root="$W/data" runs_root="$W/$name-runs" \
      method.num_groups=[4] schedule.epochs="$EPOCHS" data.batch_size="$BATCH" data.val_batch_size=8 \
      data.num_workers=1 train.max_steps_per_epoch="$MAX_STEPS" train.log_every=1 tracking.log_model=false) >"$W/$name.log" 2>&1 &
  echo $! >"$W/$name.pid"
}
job_id() { grep -o 'submitted job [0-9]*' "$W/$1.log" | head -1 | awk '{print $3}'; }

job A
wait "$(cat "$W/A.pid")" || { echo "A failed:"; tail -40 "$W/A.log"; exit 1; }
job B
until [ -f "$W/B-run/last.pt" ]; do
  kill -0 "$(cat "$W/B.pid")" 2>/dev/null || { echo "B ended before its first checkpoint:"; tail -40 "$W/B.log"; exit 1; }
  sleep 0.5
done
BID=$(job_id B)
now >"$W/B.signalled"
scancel --signal=USR2 "$BID"
wait "$(cat "$W/B.pid")" || { echo "B failed:"; tail -60 "$W/B.log"; exit 1; }

echo "A: job $(job_id A), B: job $BID, Restarts=$(scontrol show job "$BID" | grep -o 'Restarts=[0-9]*')"
(cd "$REPO" && "$PY" -m bench.slurm_probe "$W" "$RANKS" "$(job_id A)" "$BID")
