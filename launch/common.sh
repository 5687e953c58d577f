# Shared helpers for the launch scripts (sourced, not executed).
#
# What they give every script: one way to print or run a command (`run`: with --dry-run it only
# prints `+ cmd` with every word quoted by printf %q, so the printed line is exactly what would
# run), one-line errors with a non-zero exit status (`die`), option-value checks, and the jax
# version pinned in requirements.txt (so an accelerator install never drifts from the CPU pin).
# Written for bash 3.2+ (macOS workstations launch TPU jobs too): no mapfile, no ${x,,}, and
# empty arrays are expanded as ${a[@]+"${a[@]}"} under `set -u`.

# Set by each script before sourcing: LAUNCH_PROG (its name, for messages).
LAUNCH_PROG=${LAUNCH_PROG:-$(basename "$0")}
DRY_RUN=${DRY_RUN:-0}

# die MESSAGE...: prints "PROG: error: MESSAGE" on stderr and exits with status 2.
die() {
  printf '%s: error: %s\n' "$LAUNCH_PROG" "$*" >&2
  exit 2
}

# note MESSAGE...: an informational line on stderr (never mixed into the printed commands).
note() {
  printf '%s: %s\n' "$LAUNCH_PROG" "$*" >&2
}

# shell_join WORD...: the words as one shell command line, each quoted with printf %q.
shell_join() {
  local out='' word
  for word in "$@"; do
    out+=" $(printf '%q' "$word")"
  done
  printf '%s' "${out# }"
}

# print_cmd WORD...: "+ " then the quoted command, one line.
print_cmd() {
  printf '+ %s\n' "$(shell_join "$@")"
}

# run WORD...: with DRY_RUN=1 prints the command on stdout and does nothing else; otherwise
# echoes it on stderr (like `set -x`) and runs it. Builtins such as cd and export work too.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    print_cmd "$@"
  else
    print_cmd "$@" >&2
    "$@"
  fi
}

# need_value OPTION "$@": dies unless OPTION is followed by a value (a value may not look like an
# option, which catches `--zone --name x`).
need_value() {
  if (($# < 2)) || [[ $2 == --* ]]; then
    die "option $1 needs a value (see --help)"
  fi
}

# no_value OPTION WAS_GIVEN_WITH_EQUALS: dies when a flag option was written as --flag=VALUE.
no_value() {
  if [[ $2 == 1 ]]; then
    die "option $1 takes no value (see --help)"
  fi
}

# unknown_option ARG: the error for an argument no case matched.
unknown_option() {
  case $1 in
    --config.*) die "unknown option $1: pass config overrides after '--' (see --help)" ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) die "unexpected argument $1: config overrides go after '--' (see --help)" ;;
  esac
}

# require_command NAME: dies (outside --dry-run) when NAME is not on PATH.
require_command() {
  if [[ $DRY_RUN != 1 ]] && ! command -v "$1" >/dev/null 2>&1; then
    die "'$1' not found on PATH${2:+ ($2)}"
  fi
}

# jax_version REQUIREMENTS_FILE: prints the version X of the line `jax==X` in the file.
jax_version() {
  local version
  [[ -f $1 ]] || die "cannot read $1"
  version=$(sed -n 's/^[[:space:]]*jax[[:space:]]*==[[:space:]]*\([^[:space:];#]*\).*$/\1/p' "$1" | head -n 1)
  [[ -n $version ]] || die "no 'jax==VERSION' line in $1"
  printf '%s' "$version"
}

# check_fraction NAME VALUE: dies unless VALUE is a decimal number in (0, 1].
check_fraction() {
  if ! [[ $2 =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || [[ $2 =~ ^0?\.0*$ ]]; then
    die "$1 must be a number in (0, 1] (got '$2')"
  fi
}

# check_config_path ROOT CONFIG: dies unless the file part of CONFIG (before ':variant') exists,
# relative to ROOT (the repository root, where elm_jax.main runs) or absolute.
check_config_path() {
  local file=${2%%:*}
  if [[ $file == /* ]]; then
    [[ -f $file ]] || die "config file $file not found"
  else
    [[ -f $1/$file ]] || die "config file $file not found under $1 (paths are relative to the repository root)"
  fi
}
