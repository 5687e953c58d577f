#!/usr/bin/env bash
# Reruns the whole small-scale replication in the background and rebuilds RESULTS.md.
#   bash bench/replicate.sh [ROOT] [SEEDS]      (defaults: workdirs/replicate 0,1,2)
# Resumable: rerun after an interruption and finished runs are skipped. Progress: ROOT/replicate.log
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-workdirs/replicate}"
SEEDS="${2:-0,1,2}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$ROOT"
nohup bash -c "nice -n 10 $PY bench/replicate.py run --root=$ROOT --seeds=$SEEDS && \
  $PY bench/replicate.py report --root=$ROOT --out=RESULTS.md" >> "$ROOT/replicate.log" 2>&1 &
echo "replication running in the background (pid $!); follow $ROOT/replicate.log"
