#!/usr/bin/env bash
# Runs the elm-jax pipeline on one multi-GPU host.
#
# One process sees every visible GPU (the mesh spans them; no jax.distributed), so this is: make
# the venv with the pinned requirements plus jax[cuda12] at the jax version of requirements.txt
# (unless --no-install), then run `python -m elm_jax.main` from the repository root with
# XLA_PYTHON_CLIENT_MEM_FRACTION and, with --gpus, CUDA_VISIBLE_DEVICES. Run with --help.
set -euo pipefail

LAUNCH_PROG=gpu_host.sh
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$LAUNCH_DIR")
# shellcheck source=launch/common.sh
. "$LAUNCH_DIR/common.sh"

usage() {
  cat <<EOF
Usage: launch/gpu_host.sh --workdir DIR [options] [-- OVERRIDES...]

Runs python -m elm_jax.main on this host, one process over all (or --gpus) local GPUs.

Required:
  --workdir DIR         work directory (relative to the current directory or absolute)

Options:
  --config CFG          config file[:variant], relative to the repository root or absolute
                        (default: $DEFAULT_CONFIG)
  --stages STAGES       'all' or a comma list of stages (default: all)
  --gpus LIST           comma list of GPU indices, sets CUDA_VISIBLE_DEVICES (default: all GPUs)
  --mem-fraction F      XLA_PYTHON_CLIENT_MEM_FRACTION, the share of each GPU's memory JAX
                        preallocates, in (0, 1] (default: $DEFAULT_MEM_FRACTION)
  --venv DIR            virtual environment (default: the repository's .venv)
  --python PY           interpreter that creates the venv when it does not exist yet, Python >= 3.11
                        (default: $DEFAULT_PYTHON)
  --no-install          use the venv as it is (no venv creation, no pip)
  --dry-run             print each command (one per line, prefixed '+ ') instead of running it
  -h, --help            this help
  -- OVERRIDES...       passed on to elm_jax.main, e.g. -- --config.supernet.train.steps=2000

The install is: pip install -r requirements.txt, the package (editable, --no-deps), and
jax[cuda12]==$JAX_VERSION (the jax== pin of requirements.txt). It needs an NVIDIA driver on
the host; the CUDA libraries come from pip.

Example:
  launch/gpu_host.sh --config configs/clm.py:paper --workdir workdirs/clm_paper --gpus 0,1,2,3 \\
      -- --config.search.population=64
EOF
}

DEFAULT_CONFIG=configs/mlm.py
DEFAULT_MEM_FRACTION=0.90
DEFAULT_PYTHON=python3
JAX_VERSION=$(jax_version "$ROOT/requirements.txt")

CONFIG=$DEFAULT_CONFIG WORKDIR='' STAGES=all GPUS='' MEM_FRACTION=$DEFAULT_MEM_FRACTION
VENV=$ROOT/.venv PYTHON=$DEFAULT_PYTHON INSTALL=1
OVERRIDES=()

while (($#)); do
  eq=0 arg=$1
  if [[ $1 == --*=* ]]; then  # --opt=value -> --opt value
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
    eq=1
  fi
  case $1 in
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --stages) need_value "$@"; STAGES=$2; shift 2 ;;
    --gpus) need_value "$@"; GPUS=$2; shift 2 ;;
    --mem-fraction) need_value "$@"; MEM_FRACTION=$2; shift 2 ;;
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --no-install) no_value "$1" "$eq"; INSTALL=0; shift ;;
    --dry-run) no_value "$1" "$eq"; DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) unknown_option "$arg" ;;
  esac
done

# ---- validation ----
[[ -n $WORKDIR ]] || die "--workdir is required (see --help)"
[[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must be a comma list of GPU indices like 0,1,3 (got '$GPUS')"
check_fraction --mem-fraction "$MEM_FRACTION"
check_config_path "$ROOT" "$CONFIG"
# elm_jax.main runs from the repository root (so configs/... resolve); keep the caller's meaning
# of relative --workdir and --venv paths.
[[ $WORKDIR == /* ]] || WORKDIR=$PWD/$WORKDIR
[[ $VENV == /* ]] || VENV=$PWD/$VENV
PY=$VENV/bin/python
NEW_VENV=0
[[ -x $PY ]] || NEW_VENV=1
if [[ $INSTALL == 1 && $NEW_VENV == 1 ]]; then
  require_command "$PYTHON" "pass --python PATH to a Python >= 3.11"
  if [[ $DRY_RUN != 1 ]] && ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); jax $JAX_VERSION needs >= 3.11 (pass --python)"
  fi
elif [[ $INSTALL == 0 && $NEW_VENV == 1 && $DRY_RUN != 1 ]]; then
  die "no venv at $VENV (drop --no-install to create it, or pass --venv)"
fi

# ---- install ----
run cd "$ROOT"
if [[ $INSTALL == 1 ]]; then
  pip=("$PY" -m pip install --quiet)
  [[ $NEW_VENV == 0 ]] || run "$PYTHON" -m venv "$VENV"
  run "${pip[@]}" --upgrade pip
  run "${pip[@]}" -r requirements.txt
  run "${pip[@]}" --no-deps -e .
  run "${pip[@]}" "jax[cuda12]==$JAX_VERSION"
fi

# ---- run: one process, all visible GPUs ----
env_vars=("XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION")
[[ -z $GPUS ]] || env_vars+=("CUDA_VISIBLE_DEVICES=$GPUS")
run env "${env_vars[@]}" "$PY" -m elm_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "--stages=$STAGES" \
  ${OVERRIDES[@]+"${OVERRIDES[@]}"}
