#!/usr/bin/env bash
# Runs the elm-jax pipeline on a Cloud TPU VM or pod slice, from a workstation with gcloud.
#
# Steps: reuse the TPU VM when it exists (READY) or create it; put the code on every worker (a
# tarball of this checkout, or a git clone); install a venv with the pinned requirements plus
# jax[tpu] at the jax version of requirements.txt; start `python -m elm_jax.main` on ALL workers
# at once (jax.distributed.initialize() finds the coordinator itself on Cloud TPU); copy the
# workdir out from worker 0; optionally delete the VM. Run with --help for the options.
set -euo pipefail

LAUNCH_PROG=tpu_vm.sh
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$LAUNCH_DIR")
# shellcheck source=launch/common.sh
. "$LAUNCH_DIR/common.sh"

usage() {
  cat <<EOF
Usage: launch/tpu_vm.sh --name NAME --zone ZONE --accelerator-type TYPE [options] [-- OVERRIDES...]

Runs python -m elm_jax.main on every worker of a Cloud TPU VM / pod slice (created when missing,
reused when it exists and is READY), then copies the workdir out from worker 0.

Required:
  --name NAME               TPU VM name (lower case letters, digits, '-')
  --zone ZONE               zone, e.g. us-central2-b
  --accelerator-type TYPE   e.g. v4-8, v4-32, v5litepod-16, v6e-8 (used when the VM is created)

TPU VM:
  --version RUNTIME         TPU software version (default: $DEFAULT_VERSION)
  --project PROJECT         Google Cloud project (default: gcloud's configured project)
  --spot                    create a Spot VM (cheaper, preemptible; a preempted one must be deleted)
  --delete                  delete the TPU VM at the end, after the results are copied

Code and install (on every worker):
  --repo URL                git clone URL instead of copying this checkout (default: a tarball of
                            this checkout's tracked and untracked, not ignored files)
  --ref REF                 with --repo: branch, tag or commit to check out (default: remote HEAD)
  --remote-dir DIR          code directory on the workers, relative to the home directory
                            (default: $DEFAULT_REMOTE_DIR)
  --python PY               interpreter for the venv; needs Python >= 3.11, apt-installed with its
                            -venv package when missing (default: $DEFAULT_PYTHON)
  --no-install              skip the venv / pip install step (already installed)

Pipeline:
  --config CFG              config file[:variant], relative to the repository (default: $DEFAULT_CONFIG)
  --workdir DIR             work directory on the workers, relative to --remote-dir or absolute
                            (default: workdirs/NAME); on a multi-worker slice orbax checkpoints need
                            a directory all workers share (e.g. an NFS or gcsfuse mount)
  --stages STAGES           'all' or a comma list of stages (default: all)
  --results DEST            copy the workdir from worker 0 to gs://BUCKET/PATH (gcloud storage rsync
                            on the worker) or to a local directory (gcloud scp)

Other:
  --dry-run                 print each command (one per line, prefixed '+ ') instead of running it
  -h, --help                this help
  -- OVERRIDES...           passed on to elm_jax.main, e.g. -- --config.search.population=64

The jax[tpu] version is the jax== pin of requirements.txt ($JAX_VERSION).

Example:
  launch/tpu_vm.sh --name elm-v4 --zone us-central2-b --accelerator-type v4-32 --spot \\
      --config configs/mlm.py:paper --results gs://my-bucket/elm/mlm_paper --delete \\
      -- --config.search.population=64
EOF
}

DEFAULT_VERSION=tpu-ubuntu2204-base
DEFAULT_REMOTE_DIR=elm-jax
DEFAULT_PYTHON=python3.11
DEFAULT_CONFIG=configs/mlm.py
JAX_VERSION=$(jax_version "$ROOT/requirements.txt")

NAME='' ZONE='' ACCEL='' VERSION=$DEFAULT_VERSION PROJECT='' SPOT=0 DELETE=0
REPO='' REF='' REMOTE_DIR=$DEFAULT_REMOTE_DIR PYTHON=$DEFAULT_PYTHON INSTALL=1
CONFIG=$DEFAULT_CONFIG WORKDIR='' STAGES=all RESULTS=''
OVERRIDES=()

while (($#)); do
  eq=0 arg=$1
  if [[ $1 == --*=* ]]; then  # --opt=value -> --opt value
    set -- "${1%%=*}" "${1#*=}" "${@:2}"
    eq=1
  fi
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCEL=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --spot) no_value "$1" "$eq"; SPOT=1; shift ;;
    --delete) no_value "$1" "$eq"; DELETE=1; shift ;;
    --repo) need_value "$@"; REPO=$2; shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --remote-dir) need_value "$@"; REMOTE_DIR=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --no-install) no_value "$1" "$eq"; INSTALL=0; shift ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --stages) need_value "$@"; STAGES=$2; shift 2 ;;
    --results) need_value "$@"; RESULTS=$2; shift 2 ;;
    --dry-run) no_value "$1" "$eq"; DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; OVERRIDES=("$@"); break ;;
    *) unknown_option "$arg" ;;
  esac
done

# ---- validation (before anything runs) ----
[[ -n $NAME ]] || die "--name is required (see --help)"
[[ -n $ZONE ]] || die "--zone is required (see --help)"
[[ -n $ACCEL ]] || die "--accelerator-type is required (see --help)"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name must be lower case letters, digits and '-', starting with a letter (got '$NAME')"
[[ -z $REF || -n $REPO ]] || die "--ref needs --repo"
[[ $REMOTE_DIR != *'~'* ]] || die "--remote-dir is relative to the home directory already; drop the '~'"
case $RESULTS in
  '' | gs://?*) ;;
  *://*) die "--results must be gs://BUCKET/PATH or a local directory (got '$RESULTS')" ;;
esac
if [[ -z $REPO ]]; then
  [[ -e $ROOT/.git ]] || die "$ROOT is not a git checkout: pass --repo URL to clone the code instead"
  check_config_path "$ROOT" "$CONFIG"
fi
WORKDIR=${WORKDIR:-workdirs/$NAME}
require_command gcloud "install the Google Cloud CLI"

GCLOUD_FLAGS=("--zone=$ZONE")
[[ -z $PROJECT ]] || GCLOUD_FLAGS+=("--project=$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

# ssh_workers WORKERS REMOTE_COMMAND: runs the command on the given workers ('all' or an index).
ssh_workers() {
  run "${TPU[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" "--worker=$1" "--command=$2"
}

# ---- 1. the TPU VM: reuse or create ----
describe=("${TPU[@]}" describe "$NAME" "${GCLOUD_FLAGS[@]}" "--format=value(state)")
if [[ $DRY_RUN == 1 ]]; then
  print_cmd "${describe[@]}"
  echo "# dry run: the create below runs only when the describe above finds no TPU VM"
  state=''
else
  print_cmd "${describe[@]}" >&2
  state=$("${describe[@]}" 2>/dev/null) || state=''
fi
case $state in
  READY) note "reusing the existing TPU VM $NAME (READY)" ;;
  '')
    create=("${TPU[@]}" create "$NAME" "${GCLOUD_FLAGS[@]}" "--accelerator-type=$ACCEL" "--version=$VERSION")
    [[ $SPOT == 0 ]] || create+=(--spot)
    run "${create[@]}"
    ;;
  *) die "TPU VM $NAME exists in state $state; start it, or delete it ('${TPU[*]} delete $NAME --zone=$ZONE') and rerun" ;;
esac

# ---- 2. the code on every worker ----
if [[ -n $REPO ]]; then
  fetch_ref=${REF:-HEAD}
  ssh_workers all "{ [ -d $(shell_join "$REMOTE_DIR/.git") ] || git clone --quiet $(shell_join "$REPO" "$REMOTE_DIR"); } && $(shell_join git -C "$REMOTE_DIR" fetch --quiet origin "$fetch_ref") && $(shell_join git -C "$REMOTE_DIR" checkout --quiet --detach FETCH_HEAD)"
else
  # Tracked and untracked-but-not-ignored files (no .venv, no workdirs), uncommitted edits included.
  tarball="${TMPDIR:-/tmp}/elm-jax-$NAME.tar.gz"
  remote_tarball=elm-jax-src.tar.gz
  pack='cd "$1" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d "" f; do if [ -e "$f" ]; then printf "%s\0" "$f"; fi; done | tar --null -T - -czf "$2"'
  run bash -c "$pack" pack "$ROOT" "$tarball"
  run "${TPU[@]}" scp "$tarball" "$NAME:$remote_tarball" "${GCLOUD_FLAGS[@]}" --worker=all
  ssh_workers all "$(shell_join mkdir -p "$REMOTE_DIR") && $(shell_join tar -xzf "$remote_tarball" -C "$REMOTE_DIR") && $(shell_join rm -f "$remote_tarball")"
  run rm -f "$tarball"
fi

# ---- 3. install on every worker ----
if [[ $INSTALL == 1 ]]; then
  pip=(.venv/bin/python -m pip install --quiet)
  ssh_workers all "$(shell_join cd "$REMOTE_DIR") && { $(shell_join "$PYTHON" -c 'import ensurepip, venv') >/dev/null 2>&1 || { sudo apt-get update -qq && $(shell_join sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$PYTHON" "$PYTHON-venv"); }; } && $(shell_join "$PYTHON" -m venv .venv) && $(shell_join "${pip[@]}" --upgrade pip) && $(shell_join "${pip[@]}" -r requirements.txt) && $(shell_join "${pip[@]}" --no-deps -e .) && $(shell_join "${pip[@]}" "jax[tpu]==$JAX_VERSION")"
fi

# ---- 4. the pipeline, on all workers at once ----
main=(.venv/bin/python -m elm_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "--stages=$STAGES"
  --config.distributed.enabled=True ${OVERRIDES[@]+"${OVERRIDES[@]}"})
ssh_workers all "$(shell_join cd "$REMOTE_DIR") && $(shell_join "${main[@]}")"

# ---- 5. results from worker 0 ----
if [[ -n $RESULTS ]]; then
  if [[ $RESULTS == gs://* ]]; then
    ssh_workers 0 "$(shell_join cd "$REMOTE_DIR") && $(shell_join gcloud storage rsync --recursive "$WORKDIR" "$RESULTS")"
  else
    remote_workdir=$WORKDIR
    [[ $WORKDIR == /* ]] || remote_workdir=$REMOTE_DIR/$WORKDIR
    run mkdir -p "$RESULTS"
    run "${TPU[@]}" scp --recurse "$NAME:$remote_workdir" "$RESULTS" "${GCLOUD_FLAGS[@]}" --worker=0
  fi
fi

# ---- 6. optional clean-up ----
if [[ $DELETE == 1 ]]; then
  run "${TPU[@]}" delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
fi
