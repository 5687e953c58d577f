#!/usr/bin/env bash
# MFU, tokens/s and peak memory of the paper-scale supernet train step on a GPU host.
#
# Runs bench/mfu.py on configs/mlm.py:paper (H=528, 12 layers, 6 candidates per family, global
# batch 256, seq 128, supernet.remat=True, a BERT-base-shaped random-init teacher, vocab 30522) in
# bfloat16 on synthetic batches for a fixed number of steps; the result table is printed and
# appended to BENCHMARKS.md. See bench/mfu.py for what is counted.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bench/gpu.sh [options] [-- extra bench/mfu.py flags, e.g. --config.data.batch_size=128]

  --steps N        timed train steps (default 50)
  --warmup N       untimed steps first, the first compiles (default 3)
  --widths W       grown | initial: widths of the sampled architectures (default grown)
  --config SPEC    config[:variant] (default configs/mlm.py:paper)
  --python PATH    interpreter of the project's venv (default .venv/bin/python)
  --install        first install jax[cuda12] at the version pinned in requirements.txt into it
  --out FILE       markdown file to append to, '' = print only (default BENCHMARKS.md)
  --dry-run        print the commands without running them
  -h, --help       this help
EOF
}

steps=50
warmup=3
widths=grown
config=configs/mlm.py:paper
python=.venv/bin/python
install=0
dry=0
out=BENCHMARKS.md
extra=()

need_value() {
  if [[ $# -lt 2 || -z "$2" && "$1" != --out ]]; then
    echo "error: $1 needs a value" >&2
    exit 2
  fi
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --steps) need_value "$@"; steps=$2; shift 2 ;;
    --warmup) need_value "$@"; warmup=$2; shift 2 ;;
    --widths) need_value "$@"; widths=$2; shift 2 ;;
    --config) need_value "$@"; config=$2; shift 2 ;;
    --python) need_value "$@"; python=$2; shift 2 ;;
    --out) need_value "$@"; out=$2; shift 2 ;;
    --install) install=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

[[ $steps =~ ^[1-9][0-9]*$ ]] || { echo "error: --steps must be a positive integer, got '$steps'" >&2; exit 2; }
[[ $warmup =~ ^[1-9][0-9]*$ ]] || { echo "error: --warmup must be a positive integer, got '$warmup'" >&2; exit 2; }
[[ $widths == grown || $widths == initial ]] || { echo "error: --widths must be grown or initial" >&2; exit 2; }

cd "$(dirname "${BASH_SOURCE[0]}")/.."

run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ $dry -eq 0 ]]; then
    "$@"
  fi
}

if [[ $dry -eq 0 && ! -x $python ]]; then
  echo "error: no Python interpreter at $python (create the venv, or pass --python)" >&2
  exit 2
fi

if [[ $install -eq 1 ]]; then
  jax_version=$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' requirements.txt)
  [[ -n $jax_version ]] || { echo "error: no 'jax==VERSION' line in requirements.txt" >&2; exit 2; }
  run "$python" -m pip install "jax[cuda12]==${jax_version}"
fi

run "$python" -c 'import jax; print(jax.devices()); assert jax.default_backend() == "gpu", "no GPU"'

run "$python" bench/mfu.py "--config=${config}" --precision=bfloat16 --synthetic "--steps=${steps}" \
  "--warmup=${warmup}" "--widths=${widths}" "--out=${out}" ${extra[@]+"${extra[@]}"}
