#!/usr/bin/env bash
# Creates, sets up, launches on, watches and deletes a Cloud TPU VM or pod slice for vljax.
# Every remote step runs on all workers of the slice; `--dry-run` prints the commands instead.
# Remote commands are single-quoted on purpose: their $ expansions happen on the workers.
# shellcheck disable=SC2016
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tpu/vljax-tpu.sh COMMAND [FLAGS] [-- EXTRA_TRAINING_FLAGS]

Commands:
  create   create the TPU VM / pod slice (directly, or as a queued resource with --queued)
  status   describe the TPU VM (or the queued resource)
  setup    put vljax on every worker (git clone REPO_URL, or copy this checkout) and
           install it with jax[tpu] into a virtual environment
  launch   start `python experiments/main.py --config=CONFIG --workdir=WORKDIR` on every
           worker under nohup, one log file per worker; flags after `--` are passed on to
           main.py (this script's own flags, such as --dry-run, go before `--`)
  logs     follow the log of a worker (WORKER, default 0; "all" for every worker)
  stop     stop the training processes started by `launch`
  delete   delete the TPU VM (or the queued resource and its TPU VM)

Flags (each also read from the environment variable in capitals):
  --name=NAME                   TPU VM name (required)
  --zone=ZONE                   e.g. us-central2-b (required)
  --project=PROJECT             default: gcloud's configured project
  --accelerator-type=TYPE       e.g. v5litepod-16, v4-32, v6e-8 (required by create, unless
                                --config names a config whose config.tpu.topology is set)
  --runtime-version=VERSION     default: the recommended one for the accelerator type
  --spot                        spot capacity (SPOT=1)
  --queued                      use queued resources (QUEUED=1)
  --queued-resource-id=ID       default: NAME
  --config=CONFIG               e.g. clip_tiny.py (required by launch); `create` without
                                --accelerator-type creates the slice in config.tpu.topology
  --workdir=DIR                 run directory on the workers (required by launch; must be one
                                file system shared by all workers on a multi-host slice)
  --run-name=RUN                names the log files; default: CONFIG without ".py"
  --repo-url=URL                clone this repository (default: copy this checkout)
  --repo-ref=REF                branch, tag or commit to check out after cloning
  --remote-dir=DIR              checkout directory on the workers, relative to $HOME (vljax)
  --log-dir=DIR                 log directory on the workers, relative to $HOME (vljax-logs)
  --python=PYTHON               interpreter for the venv (default: python3.13/3.12/3.11,
                                else one installed with uv)
  --jax-spec=SPEC               the JAX requirement to install (default: jax[tpu])
  --local-python=PYTHON         interpreter that reads --config on this machine for `create`
                                (default: this checkout's .venv/bin/python, else python3)
  --worker=WORKER               worker for `logs` (0, 1, ... or all; default 0)
  --dry-run                     print every command, fully quoted, and run nothing (DRY_RUN=1);
                                before `--` (main.py's --dry_run is its compile-only cost report)
  -h, --help                    this text

Example:
  tpu/vljax-tpu.sh create --name=vl --zone=us-central2-b --accelerator-type=v4-32 --spot
  tpu/vljax-tpu.sh setup  --name=vl --zone=us-central2-b
  tpu/vljax-tpu.sh launch --name=vl --zone=us-central2-b --config=clip_b16.py \
      --workdir=/mnt/shared/clip_b16 -- --config.total_steps=20000
  tpu/vljax-tpu.sh logs   --name=vl --zone=us-central2-b --config=clip_b16.py
  tpu/vljax-tpu.sh delete --name=vl --zone=us-central2-b
EOF
}

die() {
  echo "vljax-tpu: $*" >&2
  exit 2
}

NAME=${NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
SPOT=${SPOT:-0}
QUEUED=${QUEUED:-0}
QUEUED_RESOURCE_ID=${QUEUED_RESOURCE_ID:-}
CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
RUN_NAME=${RUN_NAME:-}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-}
REMOTE_DIR=${REMOTE_DIR:-vljax}
LOG_DIR=${LOG_DIR:-vljax-logs}
PYTHON=${PYTHON:-}
JAX_SPEC=${JAX_SPEC:-jax[tpu]}
LOCAL_PYTHON=${LOCAL_PYTHON:-}
WORKER=${WORKER:-0}
DRY_RUN=${DRY_RUN:-0}
COMMAND=""
EXTRA_ARGS=()

# Prints the variable behind one of this script's `--flag`s; fails for any other name.
flag_var() {
  case $1 in
    --name) var=NAME ;;
    --zone) var=ZONE ;;
    --project) var=PROJECT ;;
    --accelerator-type) var=ACCELERATOR_TYPE ;;
    --runtime-version) var=RUNTIME_VERSION ;;
    --spot) var=SPOT ;;
    --queued) var=QUEUED ;;
    --queued-resource-id) var=QUEUED_RESOURCE_ID ;;
    --config) var=CONFIG ;;
    --workdir) var=WORKDIR ;;
    --run-name) var=RUN_NAME ;;
    --repo-url) var=REPO_URL ;;
    --repo-ref) var=REPO_REF ;;
    --remote-dir) var=REMOTE_DIR ;;
    --log-dir) var=LOG_DIR ;;
    --python) var=PYTHON ;;
    --jax-spec) var=JAX_SPEC ;;
    --local-python) var=LOCAL_PYTHON ;;
    --worker) var=WORKER ;;
    --dry-run) var=DRY_RUN ;;
    *) return 1 ;;
  esac
  echo "$var"
}

# Sets the variable behind a `--flag` from its value.
set_flag() {
  local var
  var=$(flag_var "$1") || die "unknown flag $1 (see --help)"
  printf -v "$var" '%s' "$2"
}

parse_args() {
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --dry-run | --spot | --queued) set_flag "$1" 1 ;;
      --) shift; EXTRA_ARGS=("$@"); break ;;
      --*=*) set_flag "${1%%=*}" "${1#*=}" ;;
      --*)
        (($# >= 2)) && [[ $2 != --* ]] || die "flag $1 needs a value"
        set_flag "$1" "$2"
        shift
        ;;
      -*) die "unknown option $1 (see --help)" ;;
      *)
        [[ -z $COMMAND ]] || die "unexpected argument $1 (see --help)"
        COMMAND=$1
        ;;
    esac
    shift
  done
}

# Flags after `--` go to experiments/main.py. One of this script's own there (`-- --dry-run`)
# was meant for the script: refuse it rather than run gcloud and pass main.py a flag it lacks.
# --config and --workdir are main.py flags too, so they may follow `--`.
check_extra_args() {
  local arg name
  for arg in ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}; do
    name=${arg%%=*}
    case $name in
      --config | --workdir) continue ;;
      --dry-run)
        die "--dry-run after -- would go to experiments/main.py: put it before -- to print" \
          "the commands without running them (main.py's own compile-only cost report is --dry_run)"
        ;;
    esac
    if flag_var "$name" >/dev/null; then
      die "$name after -- would go to experiments/main.py, which has no such flag: put it before --"
    fi
  done
  if ((${#EXTRA_ARGS[@]})) && [[ $COMMAND != launch ]]; then
    die "only 'launch' takes flags after -- (they go to experiments/main.py), not '$COMMAND'"
  fi
}

# Turns the yes/no setting in variable $1 into 1 or 0; anything unrecognised is an error, so that
# DRY_RUN=True or DRY_RUN=on never counts as "no" and runs gcloud.
normalise_bool() {
  local value
  value=$(tr '[:upper:]' '[:lower:]' <<<"${!1}")
  case $value in
    1 | true | yes | on) printf -v "$1" 1 ;;
    0 | false | no | off | "") printf -v "$1" 0 ;;
    *) die "$1=${!1} is neither yes (1, true, yes, on) nor no (0, false, no, off)" ;;
  esac
}

is_true() {
  [[ $1 == 1 ]]
}

# Quotes each argument for a POSIX shell: bare when that is safe, else in single quotes.
quote() {
  local out=() arg sq="'"
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$arg")
    else
      out+=("$sq${arg//"$sq"/"$sq\\$sq$sq"}$sq")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# The one way commands run: printed under --dry-run, else executed.
run() {
  if is_true "$DRY_RUN"; then
    quote "$@"
  else
    command "$@"
  fi
}

# gcloud only through `run` (`command` above skips this function): a call that bypasses it is a
# bug, and must not act for real during a dry run.
gcloud() {
  die "internal error: gcloud called without run (gcloud $*)"
}

require() {
  local var flag
  for var in "$@"; do
    if [[ -z ${!var} ]]; then
      flag=--$(tr '[:upper:]_' '[:lower:]-' <<<"$var")
      die "$var is required for '$COMMAND' (set $flag=... or the environment variable $var)"
    fi
  done
}

# Remote paths are spliced unquoted into remote commands (so that $HOME expands there).
require_plain() {
  local label=$1 value=$2
  [[ $value =~ ^[A-Za-z0-9_.][A-Za-z0-9_./-]*$ ]] ||
    die "$label=$value may only hold letters, digits and . _ / - (paths are relative to \$HOME)"
}

# The recommended TPU software version per generation.
default_runtime() {
  case $1 in
    v6e*) echo v2-alpha-tpuv6e ;;
    v5litepod* | v5e*) echo v2-alpha-tpuv5-lite ;;
    v5p*) echo v2-alpha-tpuv5 ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

gcloud_common() {
  GCLOUD_COMMON=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then
    GCLOUD_COMMON+=(--project="$PROJECT")
  fi
}

# Runs statements, joined into one command line, on the chosen workers of the slice.
remote() {
  local worker=$1 command
  shift
  command=$(printf '%s; ' "$@")
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_COMMON[@]}" --worker="$worker" \
    --command="${command%; }"
}

run_name() {
  local base=${RUN_NAME:-}
  if [[ -z $base && -n $CONFIG ]]; then
    base=${CONFIG##*/}
    base=${base%%:*}
    base=${base%.py}
  fi
  printf '%s' "$base"
}

# Prints "accelerator-type:TYPE", where TYPE is config.tpu.topology of CONFIG as gcloud's
# accelerator type ("v5e-16" -> v5litepod-16), or is empty when the config names no slice. The
# config is loaded here, on this machine (also under --dry-run: it only reads), by
# vljax.train.config.load_config, which does not validate it.
READ_TOPOLOGY='
import sys
try:
  sys.path.insert(0, sys.argv[1])
  from vljax.train.config import load_config
  from vljax.train.tpu import parse_slice
  config = load_config(sys.argv[2])
  topology = ((config.get("tpu") or {}).get("topology") or "").strip()
  print("accelerator-type:" + (parse_slice(topology).accelerator_type if topology else ""))
except Exception as e:
  text = (str(e).strip() or type(e).__name__).splitlines()[0]
  if not isinstance(e, (ValueError, OSError)):
    text = f"{type(e).__name__}: {text}"
  hint = "set --accelerator-type"
  if isinstance(e, ImportError):
    hint += ", or --local-python to a Python with vljax installed"
  sys.exit(f"vljax-tpu: cannot take the accelerator type from config.tpu.topology of "
           f"{sys.argv[2]}: {text} ({hint})")
'

config_accelerator_type() {
  local root python
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  python=${LOCAL_PYTHON:-}
  if [[ -z $python ]]; then
    python=python3
    if [[ -x $root/.venv/bin/python ]]; then
      python=$root/.venv/bin/python
    fi
  fi
  type -P "$python" >/dev/null ||
    die "no Python '$python' to read config.tpu.topology from $CONFIG; set --local-python or" \
      "--accelerator-type"
  "$python" -c "$READ_TOPOLOGY" "$root" "$CONFIG"
}

cmd_create() {
  require NAME ZONE
  # An explicit --accelerator-type wins; else the config's slice, if it names one.
  if [[ -z $ACCELERATOR_TYPE && -n $CONFIG ]]; then
    local out
    out=$(config_accelerator_type) || exit 2
    out=${out##*$'\n'} # the last line: the config file may print lines of its own
    [[ $out == accelerator-type:* ]] ||
      die "reading config.tpu.topology from $CONFIG printed no accelerator type"
    ACCELERATOR_TYPE=${out#accelerator-type:}
    [[ -n $ACCELERATOR_TYPE ]] ||
      die "$CONFIG names no TPU slice (config.tpu.topology is empty): set" \
        "--accelerator-type=TYPE (e.g. v5p-32), or config.tpu.topology"
  fi
  require ACCELERATOR_TYPE
  local runtime=$RUNTIME_VERSION
  if [[ -z $runtime ]]; then
    runtime=$(default_runtime "$ACCELERATOR_TYPE") ||
      die "no default runtime version for $ACCELERATOR_TYPE; set --runtime-version"
  fi
  local spot=()
  if is_true "$SPOT"; then
    spot=(--spot)
  fi
  if is_true "$QUEUED"; then
    run gcloud compute tpus queued-resources create "${QUEUED_RESOURCE_ID:-$NAME}" \
      --node-id="$NAME" "${GCLOUD_COMMON[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
      --runtime-version="$runtime" ${spot[@]+"${spot[@]}"}
    echo "vljax-tpu: queued; the slice exists once '$0 status' shows state ACTIVE" >&2
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_COMMON[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$runtime" ${spot[@]+"${spot[@]}"}
  fi
}

cmd_status() {
  require NAME ZONE
  if is_true "$QUEUED"; then
    run gcloud compute tpus queued-resources describe "${QUEUED_RESOURCE_ID:-$NAME}" \
      "${GCLOUD_COMMON[@]}"
  else
    run gcloud compute tpus tpu-vm describe "$NAME" "${GCLOUD_COMMON[@]}"
  fi
}

cmd_setup() {
  require NAME ZONE
  require_plain REMOTE_DIR "$REMOTE_DIR"
  local steps=('set -euo pipefail' 'cd "$HOME"' "dir=\$HOME/$REMOTE_DIR")
  if [[ -n $REPO_URL ]]; then
    steps+=("url=$(quote "$REPO_URL")")
    if [[ -n $REPO_REF ]]; then
      steps+=("ref=$(quote "$REPO_REF")"
        'if [ ! -d "$dir/.git" ]; then git clone --quiet "$url" "$dir"; fi'
        'git -C "$dir" fetch --quiet origin "$ref"'
        'git -C "$dir" checkout --quiet FETCH_HEAD')
    else
      steps+=('if [ -d "$dir/.git" ]; then git -C "$dir" pull --quiet --ff-only; else git clone --quiet "$url" "$dir"; fi')
    fi
  else
    # Tracked and untracked-but-not-ignored files: uncommitted edits travel, .venv does not.
    local root tarball
    local pack='git -C "$1" ls-files -z --cached --others --exclude-standard | tar -C "$1" --null -T - -czf "$2"'
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    tarball=${TMPDIR:-/tmp}/vljax-src-$NAME.tar.gz
    run bash -c "$pack" _ "$root" "$tarball"
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:vljax-src.tar.gz" "${GCLOUD_COMMON[@]}" \
      --worker=all
    steps+=('mkdir -p "$dir"' 'tar -xzf vljax-src.tar.gz -C "$dir"' 'rm -f vljax-src.tar.gz')
  fi
  if [[ -n $PYTHON ]]; then
    steps+=("py=$(quote "$PYTHON")")
  else
    # jax needs a newer Python than the TPU images' Ubuntu 22.04 has: use one if present, else
    # install uv (with pip, or its installer) and let it provide Python 3.11.
    steps+=('py=""'
      'for c in python3.13 python3.12 python3.11; do if command -v "$c" >/dev/null; then py=$c; break; fi; done'
      'if [ -z "$py" ]; then { python3 -m pip install --quiet --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh; }; "$HOME/.local/bin/uv" python install 3.11; py=$("$HOME/.local/bin/uv" python find 3.11); fi')
  fi
  steps+=("jax=$(quote "$JAX_SPEC")"
    '"$py" -m venv "$dir/.venv"'
    '"$dir/.venv/bin/pip" install --quiet --upgrade pip'
    '"$dir/.venv/bin/pip" install --quiet -e "$dir" "$jax"'
    '"$dir/.venv/bin/python" -c "import jax; print(jax.process_index(), jax.devices())"')
  remote all "${steps[@]}"
}

cmd_launch() {
  require NAME ZONE CONFIG WORKDIR
  local run train
  run=$(run_name)
  require_plain REMOTE_DIR "$REMOTE_DIR"
  require_plain LOG_DIR "$LOG_DIR"
  require_plain RUN_NAME "$run"
  # Every worker is one process of JAX's multi-controller runtime; "auto" lets
  # jax.distributed.initialize() find the slice's other hosts.
  train=$(quote .venv/bin/python experiments/main.py --config="$CONFIG" --workdir="$WORKDIR" \
    --config.distributed.mode=auto ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
  remote all 'set -euo pipefail' "run=$run" "logdir=\$HOME/$LOG_DIR" \
    'log=$logdir/$run-$(hostname)' 'mkdir -p "$logdir"' "cd \"\$HOME/$REMOTE_DIR\"" \
    'if [ -f "$log.pid" ] && kill -0 "$(cat "$log.pid")" 2>/dev/null; then echo "$(hostname): $run is already running" >&2; exit 1; fi' \
    "nohup $train > \"\$log.log\" 2>&1 < /dev/null & echo \$! > \"\$log.pid\"" \
    'echo "$(hostname): started $run, log $log.log"'
}

cmd_logs() {
  require NAME ZONE
  local run
  run=$(run_name)
  require_plain LOG_DIR "$LOG_DIR"
  require_plain RUN_NAME "${run:-all}"
  remote "$WORKER" "logdir=\$HOME/$LOG_DIR" \
    'tail -n 200 -F "$logdir"/'"${run:-*}"'-"$(hostname)".log'
}

cmd_stop() {
  require NAME ZONE
  local run
  run=$(run_name)
  require_plain LOG_DIR "$LOG_DIR"
  require_plain RUN_NAME "${run:-all}"
  remote all "logdir=\$HOME/$LOG_DIR" \
    'for f in "$logdir"/'"${run:-*}"'-"$(hostname)".pid; do if [ -f "$f" ]; then kill "$(cat "$f")" 2>/dev/null || true; rm -f "$f"; echo "$(hostname): stopped $f"; fi; done'
}

cmd_delete() {
  require NAME ZONE
  if is_true "$QUEUED"; then
    run gcloud compute tpus queued-resources delete "${QUEUED_RESOURCE_ID:-$NAME}" \
      "${GCLOUD_COMMON[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_COMMON[@]}" --quiet
  fi
}

main() {
  parse_args "$@"
  if [[ -z $COMMAND ]]; then
    usage >&2
    exit 2
  fi
  normalise_bool DRY_RUN
  normalise_bool SPOT
  normalise_bool QUEUED
  check_extra_args
  if ! is_true "$DRY_RUN" && ! type -P gcloud >/dev/null; then
    die "gcloud is not installed (https://cloud.google.com/sdk/docs/install); try --dry-run"
  fi
  gcloud_common
  case $COMMAND in
    create | status | setup | launch | logs | stop | delete) "cmd_$COMMAND" ;;
    *) die "unknown command '$COMMAND' (see --help)" ;;
  esac
}

main "$@"
