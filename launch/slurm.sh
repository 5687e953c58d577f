#!/usr/bin/env bash
#SBATCH --job-name=elm-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --output=elm-jax-%j.out
#
# Runs the elm-jax pipeline on several SLURM nodes: one process per node, each seeing all of its
# node's GPUs, joined by jax.distributed. Submit from the repository root:
#   sbatch [--nodes=N] [--gpus-per-node=G] [--time=...] launch/slurm.sh --workdir DIR [options]
# (sbatch options override the #SBATCH lines above). Or print the commands outside SLURM:
#   launch/slurm.sh --dry-run --nodelist 'node[01-02]' --workdir DIR
#
# The batch step takes the coordinator from the allocation (the first host of
# `scontrol show hostnames "$SLURM_JOB_NODELIST"`, plus a port), exports
# JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES (= SLURM_NTASKS), and `srun` starts one task per
# node that exports JAX_PROCESS_ID (= its SLURM_PROCID) and runs python -m elm_jax.main with
# --config.distributed.enabled=True; elm_jax/distributed.py reads these three variables.
set -euo pipefail

LAUNCH_PROG=slurm.sh
# Under sbatch this file runs from a copy in SLURM's spool directory, so the repository is found
# from the submit directory (or ELM_JAX_ROOT) when it is not beside the script.
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -f $LAUNCH_DIR/common.sh ]]; then
  ROOT=$(dirname "$LAUNCH_DIR")
elif [[ -n ${ELM_JAX_ROOT:-} && -f ${ELM_JAX_ROOT:-}/launch/common.sh ]]; then
  ROOT=$ELM_JAX_ROOT
elif [[ -n ${SLURM_SUBMIT_DIR:-} && -f ${SLURM_SUBMIT_DIR:-}/launch/common.sh ]]; then
  ROOT=$SLURM_SUBMIT_DIR
else
  echo "$LAUNCH_PROG: error: cannot find the elm-jax repository: submit from its root or set ELM_JAX_ROOT" >&2
  exit 2
fi
# shellcheck source=launch/common.sh
. "$ROOT/launch/common.sh"

usage() {
  cat <<EOF
Usage: sbatch [SBATCH OPTIONS] launch/slurm.sh --workdir DIR [options] [-- OVERRIDES...]
       launch/slurm.sh --dry-run --nodelist LIST --workdir DIR [options] [-- OVERRIDES...]

Runs python -m elm_jax.main on every node of the SLURM allocation, one process per node.
Defaults in the #SBATCH lines: --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --time=24:00:00;
override them on the sbatch command line (keep one task per node).

Required:
  --workdir DIR         work directory on a filesystem all nodes share (relative to the
                        submit directory, or absolute)

Options:
  --config CFG          config file[:variant], relative to the repository root or absolute
                        (default: $DEFAULT_CONFIG)
  --stages STAGES       'all' or a comma list of stages (default: all)
  --port N              coordinator port on the first node (default: 20000 + SLURM_JOB_ID % 10000,
                        so jobs sharing a node do not collide; $DEFAULT_PORT outside a job)
  --mem-fraction F      XLA_PYTHON_CLIENT_MEM_FRACTION in (0, 1] (default: $DEFAULT_MEM_FRACTION)
  --venv DIR            virtual environment on the shared filesystem (default: the repository's .venv)
  --install             first install into the venv, once, from the batch step: create it when
                        missing (with --python), pip install -r requirements.txt, the package and
                        jax[cuda12]==$JAX_VERSION (the jax== pin of requirements.txt)
  --python PY           interpreter that creates a missing venv, Python >= 3.11 (default: $DEFAULT_PYTHON)
  --nodelist LIST       with --dry-run: the node list to use instead of the allocation's, in SLURM
                        syntax, e.g. 'node[01-02]' or 'gpu[1-3,7],login1'
  --dry-run             print each command (one per line, prefixed '+ ') instead of running it
  -h, --help            this help
  -- OVERRIDES...       passed on to elm_jax.main, e.g. -- --config.search.population=64

Example:
  sbatch --nodes=4 --gpus-per-node=4 launch/slurm.sh --config configs/mlm.py:paper \\
      --workdir /shared/elm/mlm_paper -- --config.search.population=64
EOF
}

DEFAULT_CONFIG=configs/mlm.py
DEFAULT_PORT=29500
DEFAULT_MEM_FRACTION=0.90
DEFAULT_PYTHON=python3
JAX_VERSION=$(jax_version "$ROOT/requirements.txt")

CONFIG=$DEFAULT_CONFIG WORKDIR='' STAGES=all PORT='' MEM_FRACTION=$DEFAULT_MEM_FRACTION
VENV=$ROOT/.venv INSTALL=0 PYTHON=$DEFAULT_PYTHON NODELIST=''
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
    --port) need_value "$@"; PORT=$2; shift 2 ;;
    --mem-fraction) need_value "$@"; MEM_FRACTION=$2; shift 2 ;;
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    --install) no_value "$1" "$eq"; INSTALL=1; shift ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --nodelist) need_value "$@"; NODELIST=$2; shift 2 ;;
    --dry-run) no_value "$1" "$eq"; DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) unknown_option "$arg" ;;
  esac
done

# expand_hostlist LIST: prints the hosts of a SLURM host list one per line, like
# `scontrol show hostnames` (used for --dry-run outside SLURM, where scontrol is absent):
# 'node[01-03,07],login1' -> node01 node02 node03 node07 login1 (zero padding kept).
expand_hostlist() {
  local list=$1 entry='' depth=0 i c
  for ((i = 0; i < ${#list}; i++)); do
    c=${list:i:1}
    case $c in
      '[') depth=$((depth + 1)) ;;
      ']') depth=$((depth - 1)) ;;
    esac
    if [[ $c == , && $depth == 0 ]]; then
      expand_host "$entry" || return 1
      entry=''
    else
      entry+=$c
    fi
  done
  [[ $depth == 0 ]] || return 1
  expand_host "$entry"
}

# expand_host ENTRY: one comma-free (at top level) entry, e.g. 'rack[1-2]-gpu[01-02]'.
expand_host() {
  local entry=$1 prefix rest ranges suffix range lo hi n tail
  [[ -n $entry ]] || return 1
  if [[ $entry != *'['* ]]; then
    [[ $entry != *']'* ]] || return 1
    printf '%s\n' "$entry"
    return 0
  fi
  prefix=${entry%%\[*}
  rest=${entry#*\[}
  [[ $rest == *']'* ]] || return 1
  ranges=${rest%%\]*}
  suffix=${rest#*\]}
  local tails
  if [[ -n $suffix ]]; then
    tails=$(expand_host "$suffix") || return 1
  else
    tails=''
  fi
  local IFS=,
  for range in $ranges; do
    if [[ $range =~ ^([0-9]+)-([0-9]+)$ ]]; then
      lo=${BASH_REMATCH[1]} hi=${BASH_REMATCH[2]}
    elif [[ $range =~ ^[0-9]+$ ]]; then
      lo=$range hi=$range
    else
      return 1
    fi
    ((10#$lo <= 10#$hi)) || return 1
    for ((n = 10#$lo; n <= 10#$hi; n++)); do
      if [[ -z $suffix ]]; then
        printf '%s%0*d\n' "$prefix" "${#lo}" "$n"
      else
        while IFS= read -r tail; do
          printf '%s%0*d%s\n' "$prefix" "${#lo}" "$n" "$tail"
        done <<<"$tails"
      fi
    done
  done
}

# ---- validation ----
[[ -n $WORKDIR ]] || die "--workdir is required (see --help)"
check_fraction --mem-fraction "$MEM_FRACTION"
check_config_path "$ROOT" "$CONFIG"
[[ -z $PORT || ($PORT =~ ^[0-9]+$ && $PORT -ge 1024 && $PORT -le 65535) ]] ||
  die "--port must be an integer in [1024, 65535] (got '$PORT')"
[[ -z $NODELIST || $DRY_RUN == 1 ]] || die "--nodelist is for --dry-run only (a job uses its allocation)"
if [[ $DRY_RUN != 1 ]]; then
  [[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_JOB_NODELIST:-} ]] ||
    die "not inside a SLURM job: submit with 'sbatch launch/slurm.sh ...', or use --dry-run --nodelist LIST"
  require_command scontrol
  require_command srun
fi
[[ $WORKDIR == /* ]] || WORKDIR=$PWD/$WORKDIR
[[ $VENV == /* ]] || VENV=$PWD/$VENV
PY=$VENV/bin/python

# ---- the nodes and the coordinator ----
if [[ -n $NODELIST ]]; then
  hosts=$(expand_hostlist "$NODELIST") || die "cannot parse --nodelist '$NODELIST' (SLURM syntax, e.g. node[01-02],login1)"
elif [[ -z ${SLURM_JOB_NODELIST:-} ]]; then
  die "--dry-run outside a SLURM job needs --nodelist LIST (e.g. 'node[01-02]')"
elif command -v scontrol >/dev/null 2>&1; then
  [[ $DRY_RUN == 1 ]] || print_cmd scontrol show hostnames "$SLURM_JOB_NODELIST" >&2
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
  hosts=$(expand_hostlist "$SLURM_JOB_NODELIST") || die "cannot parse SLURM_JOB_NODELIST '$SLURM_JOB_NODELIST'"
fi
num_nodes=$(printf '%s\n' "$hosts" | grep -c .) || true
first_host=$(printf '%s\n' "$hosts" | head -n 1)
[[ $num_nodes -ge 1 && -n $first_host ]] || die "empty node list"
NUM_PROCESSES=${SLURM_NTASKS:-$num_nodes}
[[ $NUM_PROCESSES == "$num_nodes" ]] ||
  die "one process per node expected, but SLURM_NTASKS=$NUM_PROCESSES for $num_nodes nodes (submit with --ntasks-per-node=1)"
if [[ -z $PORT ]]; then
  if [[ -n ${SLURM_JOB_ID:-} ]]; then
    PORT=$((20000 + SLURM_JOB_ID % 10000))
  else
    PORT=$DEFAULT_PORT
  fi
fi

# ---- environment shared by every task (srun passes the batch step's environment on) ----
run cd "$ROOT"
run export "JAX_COORDINATOR_ADDRESS=$first_host:$PORT"
run export "JAX_NUM_PROCESSES=$NUM_PROCESSES"
run export "XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION"

# ---- optional install, once, on the shared filesystem ----
if [[ $INSTALL == 1 ]]; then
  if [[ ! -x $PY ]]; then
    require_command "$PYTHON" "pass --python PATH to a Python >= 3.11"
    run "$PYTHON" -m venv "$VENV"
  fi
  pip=("$PY" -m pip install --quiet)
  run "${pip[@]}" --upgrade pip
  run "${pip[@]}" -r requirements.txt
  run "${pip[@]}" --no-deps -e .
  run "${pip[@]}" "jax[cuda12]==$JAX_VERSION"
elif [[ $DRY_RUN != 1 && ! -x $PY ]]; then
  die "no venv at $VENV (pass --install to create it, or --venv)"
fi

# ---- one process per node; each takes its process id from its own SLURM_PROCID ----
task='export JAX_PROCESS_ID="$SLURM_PROCID"; exec "$@"'
run srun "--nodes=$num_nodes" "--ntasks=$NUM_PROCESSES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  bash -c "$task" elm-jax-task \
  "$PY" -m elm_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "--stages=$STAGES" \
  --config.distributed.enabled=True ${OVERRIDES[@]+"${OVERRIDES[@]}"}
