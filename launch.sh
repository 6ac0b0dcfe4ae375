#!/usr/bin/env bash
# launch.sh: run a config's training script on the chosen devices; safe to repeat from cron or nohup.
#
#   ./launch.sh CONFIG [--gpus auto|auto:N|cpu|cpu:N|0,1,...] [--detach] [--dry_run] [--show] [-- script args]
#   ./launch.sh --tests [pytest args]                 run the test suite
#
# It runs stage 2 of prepare -> train -> diagnose. Stage 1 runs once before it, with plain python (one process,
# no devices): python prepare_tuab.py SRC --out DIR --config CONFIG (the TUAB download -> the windows a probe
# config names) or python prepare_text.py TEXT... --tokenizer DIR --out DIR (text -> token files, data.yaml);
# stage 3: python diagnose_and_fix.py --config CONFIG, or --log runs/NAME/metrics.jsonl.
#
#   --gpus auto     every idle GPU (nvidia-smi memory used < KIT_GPU_IDLE_MB, default 1000); auto:N = N of them
#   --gpus cpu      one CPU process; cpu:N = N CPU processes (gloo)
#   --gpus 0,2      exactly these GPUs
#   (no --gpus)     auto when nvidia-smi is on PATH, else cpu
#   --detach        run in the background (setsid + nohup), print the pid and the log, return at once
#   --dry_run       the script's --dry_run on the same processes (one node), nothing written to the run dir
#   --show          print the device choice and the command, run nothing
#
# One device -> plain python; several -> torchrun (python -m torch.distributed.run) --standalone; several
# nodes when NNODES > 1 (with NODE_RANK, MASTER_ADDR, MASTER_PORT) through torchrun's static rendezvous.
# A lock per run dir makes a repeated launch harmless: a live run -> "already running (pid N)", exit 0;
# a finished run -> "complete", exit 0 (relaunched with other values: exit 2, start a new run_name or --run_dir;
# its export missing: the script writes it); a crashed or killed run resumes (the scripts default to --resume auto).
# Exit status: the training's (0 done, 1 aborted, 2 config error, 128+N stopped by signal N); launch.sh's
# own errors: 2 bad input, 3 no device to run on.
# The interpreter: KIT_PYTHON when set; else the python3 on PATH when it has torch, numpy, pyyaml and tqdm
# (pytest too for --tests); else a local .venv, made on first use (so a machine with only python3 works).
# The first line printed names it; --tests runs pytest with it and the tests' own launches use it too.
# Environment (see docs/robustness.md):
#   KIT_PYTHON      the interpreter to use, e.g. in a crontab line (cron's PATH is /usr/bin:/bin)
#   KIT_VENV        where the bootstrap venv lives (default: .venv next to launch.sh)
#   KIT_TORCH       the torch the bootstrap installs (default: requirements.txt's), e.g. 'torch==2.13.0'
#   KIT_TORCH_INDEX the index it comes from (default: the CPU wheels when nvidia-smi is missing, else PyPI)
set -euo pipefail
KIT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${KIT_VENV:-$KIT_DIR/.venv}"

die() {  # die CODE MESSAGE: one line on stderr, nothing started
  local code=$1; shift
  echo "launch.sh: $*" >&2
  exit "$code"
}

ensure_python() {  # sets PY and PY_WHY; $1 = extra packages the caller needs (e.g. pytest)
  # find_spec looks for the packages without importing them (importing torch alone takes a second)
  local need="import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in 'torch numpy yaml tqdm ${1:-}'.split()))"
  if [ -n "${KIT_PYTHON:-}" ]; then
    "$KIT_PYTHON" -c "$need" 2>/dev/null \
      || die 2 "KIT_PYTHON=$KIT_PYTHON cannot import torch, numpy, yaml and tqdm${1:+ and $1}; install them there, or unset KIT_PYTHON"
    PY=$KIT_PYTHON PY_WHY="KIT_PYTHON"; return
  fi
  # C5: the user's python3 first: what they installed (transformers too) is what runs, and the README's cron
  # advice (put the python3 that has torch on PATH) holds even after a .venv was made. .venv is the fallback.
  if command -v python3 >/dev/null 2>&1 && python3 -c "$need" 2>/dev/null; then
    PY=$(command -v python3) PY_WHY="the python3 on PATH"; return
  fi
  PY_WHY="python3 on PATH lacks torch, numpy, pyyaml or tqdm${1:+ or $1}: the kit's venv"
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$need" 2>/dev/null; then PY="$VENV/bin/python"; return; fi
  # One bootstrap at a time: two cron ticks during a first install would break each other's half-made venv.
  # fd 8 is closed again below, so the training process never holds this lock.
  mkdir -p "$(dirname "$VENV")"
  exec 8>"$VENV.lock"
  if ! flock -n 8; then
    echo "launch.sh: another launch is installing into $VENV; waiting for it" >&2
    flock 8
  fi
  if ! { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$need" 2>/dev/null; }; then
    install_requirements "${1:-}"
  fi
  exec 8>&-
  PY="$VENV/bin/python"
}

install_requirements() {  # into $VENV (the caller holds the install lock); $1 = extra packages
  if ! { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }; then
    # --clear: a venv left half-made by a killed install is rebuilt; --system-site-packages: a torch already
    # on the machine is reused instead of downloaded again
    echo "launch.sh: python3 lacks torch, numpy, pyyaml or tqdm${1:+ or $1}: creating $VENV for them" >&2
    python3 -m venv --clear --system-site-packages "$VENV" || die 3 "python3 -m venv failed (on Debian/Ubuntu: apt install python3-venv)"
  fi
  if ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)"; then
    local spec index why reach
    spec=${KIT_TORCH:-$(grep -E '^torch' "$KIT_DIR/requirements.txt" | head -n 1)}
    if [ -n "${KIT_TORCH_INDEX+set}" ]; then
      index=$KIT_TORCH_INDEX; why="KIT_TORCH_INDEX"
    elif command -v nvidia-smi >/dev/null 2>&1; then
      index=""; why="nvidia-smi found: the CUDA build, several GB"
    else
      index="https://download.pytorch.org/whl/cpu"; why="no nvidia-smi: the CPU build, a few hundred MB"
    fi
    echo "launch.sh: installing '$spec' from ${index:-PyPI} ($why) into $VENV, because no python3 here has torch;" \
         "choose the build with KIT_TORCH='torch==2.13.0' and KIT_TORCH_INDEX=URL (empty: PyPI), see docs/robustness.md" >&2
    reach="KIT_TORCH_INDEX=URL of an index this machine reaches"
    [ -z "$index" ] || reach="KIT_TORCH_INDEX= to install from PyPI (or $reach)"
    pip_install "'$spec' from ${index:-PyPI}" \
      "set $reach, KIT_TORCH=another build, or KIT_PYTHON to a python that has torch" \
      ${index:+--index-url "$index"} "$spec"
  fi
  echo "launch.sh: installing requirements.txt${1:+ and $1} into $VENV" >&2
  pip_install "requirements.txt${1:+ and $1}" \
    "check the network (or pip's index settings), or set KIT_PYTHON to a python that has them" \
    -r "$KIT_DIR/requirements.txt" ${1:+$1}
}

pip_install() {  # pip_install WHAT FIX PIP_ARGS...: into $VENV; on failure one line naming pip's error and the fix
  # C5: an unreachable index (a firewall that drops packets) made pip wait its timeout on each of 5 retries:
  # minutes of silence. Short waits, one retry (a user's PIP_DEFAULT_TIMEOUT / PIP_RETRIES still win); pip's
  # own output goes to a log, so a failure is our one line, with pip's last error in it.
  local what=$1 fix=$2 log="$VENV/pip-install.log"; shift 2
  if ! "$VENV/bin/python" -m pip install --quiet --timeout "${PIP_DEFAULT_TIMEOUT:-${PIP_TIMEOUT:-15}}" \
       --retries "${PIP_RETRIES:-1}" "$@" > "$log" 2>&1; then
    local error silent=""
    error=$(grep -E '^ERROR' "$log" | tail -n 1 | sed 's/^ERROR: //' || true)
    grep -qE 'NewConnectionError|ConnectTimeoutError|Read timed out|name resolution' "$log" \
      && silent="the index did not answer; "
    die 3 "installing $what into $VENV failed (${silent}pip: ${error:-see its output}); $fix (pip's output: $log)"
  fi
}

describe_python() {  # the interpreter's real path and versions (a pyenv shim or a venv link names another file)
  local text
  text=$("$PY" -c 'import sys, importlib.metadata as m; print("%s (Python %s, torch %s)" % (sys.executable, sys.version.split()[0], m.version("torch")))' 2>/dev/null) || text=""
  echo "${text:-$PY} [$PY_WHY]"
}

if [ "${1:-}" = "--tests" ]; then
  shift
  ensure_python pytest
  echo "launch.sh: tests with $(describe_python)"
  cd "$KIT_DIR"
  export KIT_PYTHON="$PY"  # the tests' own launches run on this interpreter too: one Python for the whole suite
  exec "$PY" -m pytest -q "$@"
fi

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }  # the header

# ---------------------------------------------------------------------------------------------------
# 1. Arguments: launch.sh's own options, then everything after -- goes to the training script.
CONFIG="" GPUS="" DETACH=0 DRY=0 SHOW=0 SCRIPT_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; SCRIPT_ARGS=("$@"); break ;;
    --gpus) [ $# -ge 2 ] || die 2 "--gpus needs a value: auto, auto:N, cpu, cpu:N or a GPU list like 0,1"
            GPUS=$2; shift 2 ;;
    --gpus=*) GPUS=${1#--gpus=}; shift ;;
    --detach) DETACH=1; shift ;;
    --dry_run|--dry-run) DRY=1; shift ;;
    --show) SHOW=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) die 2 "unknown option $1; see ./launch.sh --help (script options go after --)" ;;
    *) [ -z "$CONFIG" ] || die 2 "two configs given ($CONFIG, $1); script options go after --"
       CONFIG=$1; shift ;;
  esac
done
[ -n "$CONFIG" ] || { usage >&2; exit 2; }
[ ! -d "$CONFIG" ] || die 2 "config $CONFIG is a directory; give the path of a YAML config file"  # C3
[ -f "$CONFIG" ] || die 2 "config $CONFIG not found; give the path of a YAML config"
for arg in ${SCRIPT_ARGS[@]+"${SCRIPT_ARGS[@]}"}; do
  if [ "$arg" = "--dry_run" ]; then DRY=1; fi  # the same dry run either way: on the launch's processes
done
[ "$DETACH" = 0 ] || [ "$DRY" = 0 ] || die 2 "--detach with --dry_run: the dry run takes seconds, run it in the foreground"
NNODES=${NNODES:-1}
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die 2 "NNODES=$NNODES is not a whole number >= 1"
if [ "$NNODES" -gt 1 ]; then
  [[ "${NODE_RANK:-}" =~ ^[0-9]+$ ]] && [ "$NODE_RANK" -lt "$NNODES" ] \
    || die 2 "NNODES=$NNODES needs NODE_RANK=0..$((NNODES - 1)) (0 on the master node), got '${NODE_RANK:-}'"
  [ -n "${MASTER_ADDR:-}" ] || die 2 "NNODES=$NNODES needs MASTER_ADDR, the address of the NODE_RANK=0 host"
fi

ensure_python

# ---------------------------------------------------------------------------------------------------
# 2. Preflight through the script itself (its own parse_args and resolve_config, so launch.sh judges the
#    run the script will run): which script, which run dir, and what its last checkpoint says.
PRE_ARGS=("$KIT_DIR" "$CONFIG" ${SCRIPT_ARGS[@]+"${SCRIPT_ARGS[@]}"})
if [ "$DRY" = 1 ]; then PRE_ARGS+=(--dry_run); fi
PREFLIGHT=$("$PY" - "${PRE_ARGS[@]}" <<'PYTHON'
import importlib.util, os, shlex, sys
import yaml

kit, config, *script_args = sys.argv[1:]


def kit_script(name):
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(kit, name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def yaml_error_text(err):  # where and why, in the scripts' own words (their shared config block)
    return kit_script("train_probe.py").yaml_error_text(err)


def fail(message):
    print(f"launch.sh: {message}", file=sys.stderr)
    sys.exit(2)


try:
    with open(config) as f:
        raw = yaml.safe_load(f) or {}
except OSError as err:
    fail(f"{config} cannot be read ({err.strerror}); fix the path or its permissions")
except yaml.YAMLError as err:
    fail(f"{config} is not valid YAML ({yaml_error_text(err)}); fix the syntax there")
if not isinstance(raw, dict):
    fail(f"{config} must be a YAML mapping of keys to values")
task = str(raw.get("task", "probe"))
script = os.path.join(kit, f"train_{task}.py")
if not os.path.isfile(script):
    import difflib, glob
    tasks = sorted(os.path.basename(p)[len("train_"):-len(".py")] for p in glob.glob(os.path.join(kit, "train_*.py")))
    close = difflib.get_close_matches(task, tasks, n=1, cutoff=0.5)
    fail(f"task '{task}' in {config} has no script train_{task}.py; "
         + (f"did you mean task: {close[0]} (train_{close[0]}.py)?" if close else f"the tasks are {', '.join(tasks)}"))
mod = kit_script(f"train_{task}.py")
sys.argv[0] = os.path.basename(script)  # argparse names the script in its messages
args = mod.parse_args(["--config", config, *script_args])  # bad script options: argparse says so, exit 2
fields = {"SCRIPT": script, "TASK": task, "RUN_DIR": "", "STATUS": "fresh", "CKPT_WORLD": "", "CKPT_STEP": "",
          "CKPT_BATCH": "", "BATCH": "", "NO_RUN_DIR": "0", "PENDING": ""}
# R10: --cache_teacher builds kd.teacher_cache and makes no run dir: a finished run's last.pt and the run dir's lock are
# not its business (the cache has its own lock); the script itself checks the config
if getattr(args, "cache_teacher", False):
    fields["NO_RUN_DIR"] = "1"
elif not args.dry_run:
    try:
        cfg, _ = mod.resolve_config(args.config, args.set)
    except mod.ConfigError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
    fields["RUN_DIR"] = args.run_dir or os.path.join("runs", cfg["run_name"])
    fields["BATCH"] = cfg["train.batch_size"]
    last = os.path.join(fields["RUN_DIR"], "checkpoints", "last.pt")
    if args.resume == "auto" and os.path.exists(last):
        import torch
        try:  # mmap: a multi-GB checkpoint is not read into memory to look at three fields
            ckpt = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
            fields.update(STATUS="finished" if ckpt.get("finished") else "partial",
                          CKPT_WORLD=ckpt.get("world_size", ""), CKPT_STEP=ckpt.get("global_step", ""),
                          CKPT_BATCH=ckpt["schedule"]["train.batch_size"] * ckpt["world_size"])  # R5: global micro-batch
        except Exception:  # torn or unreadable: the script falls back to last.prev.pt itself (R6)
            fields["STATUS"] = "unreadable"
        else:  # a finished run relaunched with other values: say how to start a new run, not "complete".
            # R12: "complete" is the script's word: a missing export (distill) or a changed build file (probe)
            # sends the launch on to the script, which finishes the run or refuses it.
            try:
                pending = mod.finished_run_verdict(cfg, ckpt, fields["RUN_DIR"]) if ckpt.get("finished") else None
            except mod.ConfigError as err:  # other values, or a backbone.target that does not import: as the script
                print(err, file=sys.stderr)
                sys.exit(2)
            if pending:
                fields.update(STATUS="finishing", PENDING=pending)
for key, value in fields.items():
    print(f"{key}={shlex.quote(str(value))}")
PYTHON
) || exit $?
eval "$PREFLIGHT"
[ "$DETACH" = 0 ] || [ "$NO_RUN_DIR" = 0 ] || die 2 "--detach with --cache_teacher: the cache build makes no run dir to hold launch.log; run it in the foreground (or under nohup)"

# ---------------------------------------------------------------------------------------------------
# 3. One lock per run dir (per node): a second launch while the first is alive does nothing. The lock is
#    held by the training process itself (it inherits fd 9), so it lasts exactly as long as the run.
NODE_TAG=""
[ "$NNODES" -gt 1 ] && NODE_TAG=".node${NODE_RANK:-0}"
if [ "$DRY" = 0 ] && [ "$SHOW" = 0 ] && [ "$NO_RUN_DIR" = 0 ]; then
  TOP="$RUN_DIR"  # C3: the first of RUN_DIR's missing parents (runs/): a refused run removes it too, while empty
  while [ ! -d "$(dirname "$TOP")" ]; do TOP=$(dirname "$TOP"); done
  # made for the lock: a run the script refuses removes it (C3)
  [ -d "$RUN_DIR" ] || export KIT_NEW_RUN_DIR="$RUN_DIR" KIT_NEW_RUN_TOP="$TOP"
  if [ -e "$RUN_DIR" ] && [ ! -d "$RUN_DIR" ]; then  # C3: the scripts' own line (check_resume_mode), not mkdir's
    echo "config error: --run_dir: $RUN_DIR is a file, not a directory; give another --run_dir" >&2
    exit 2
  fi
  mkdir -p "$RUN_DIR"
  LOCK="$RUN_DIR/launch$NODE_TAG.lock"
  exec 9<>"$LOCK"
  if ! flock -n 9; then
    pid=$(tr -dc '0-9' < "$LOCK" | head -c 12)
    echo "launch.sh: $RUN_DIR is already running (pid ${pid:-unknown}); nothing to do"
    exit 0
  fi
  if [ "$STATUS" = finished ]; then
    echo "launch.sh: $RUN_DIR is complete (step $CKPT_STEP, $RUN_DIR/checkpoints/last.pt); nothing to do"
    exit 0
  fi
  if [ "$STATUS" = finishing ]; then
    echo "launch.sh: $RUN_DIR finished training (step $CKPT_STEP) but $PENDING; running the script for it"
  fi
fi

# ---------------------------------------------------------------------------------------------------
# 4. Devices: CUDA_VISIBLE_DEVICES and the number of processes on this node.
if [ -z "$GPUS" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then GPUS=auto; else GPUS=cpu; fi
fi
case "$GPUS" in
  cpu) NPROC=1; VISIBLE=""; WHAT="1 CPU process" ;;
  cpu:*)
    NPROC=${GPUS#cpu:}
    [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die 2 "--gpus $GPUS: the process count after cpu: must be a whole number >= 1"
    VISIBLE=""; WHAT="$NPROC CPU process(es), gloo" ;;
  auto|auto:*)
    WANT=${GPUS#auto}; WANT=${WANT#:}
    [ -z "$WANT" ] || [[ "$WANT" =~ ^[1-9][0-9]*$ ]] || die 2 "--gpus $GPUS: the GPU count after auto: must be a whole number >= 1"
    LIMIT=${KIT_GPU_IDLE_MB:-1000}
    command -v nvidia-smi >/dev/null 2>&1 || die 3 "--gpus $GPUS: nvidia-smi is not on PATH, so no idle GPU can be found; use --gpus cpu (or cpu:N), or name the GPUs (--gpus 0,1)"
    TABLE=$(nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits 2>&1) \
      || die 3 "--gpus $GPUS: nvidia-smi failed: $(echo "$TABLE" | head -n 1)"
    IDLE=() BUSY=()
    while IFS=', ' read -r index used _rest; do
      [[ "$index" =~ ^[0-9]+$ ]] || continue
      if [[ "$used" =~ ^[0-9]+$ ]] && [ "$used" -lt "$LIMIT" ]; then IDLE+=("$index"); else BUSY+=("$index: $used MiB"); fi
    done <<< "$TABLE"
    [ ${#IDLE[@]} -gt 0 ] || die 3 "--gpus $GPUS: no idle GPU (memory used >= $LIMIT MiB on every one: $(IFS=,; echo "${BUSY[*]:-none found}")); wait, raise KIT_GPU_IDLE_MB, or name the GPUs (--gpus 0,1)"
    if [ -n "$WANT" ]; then
      [ ${#IDLE[@]} -ge "$WANT" ] || die 3 "--gpus $GPUS: only ${#IDLE[@]} idle GPU(s) (${IDLE[*]}), $WANT wanted"
      IDLE=("${IDLE[@]:0:$WANT}")
    fi
    VISIBLE=$(IFS=,; echo "${IDLE[*]}"); NPROC=${#IDLE[@]}
    WHAT="idle GPU(s) $VISIBLE (memory used < $LIMIT MiB)${BUSY[0]+; busy: $(IFS=,; echo "${BUSY[*]}")}" ;;
  *)
    [[ "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die 2 "--gpus $GPUS: expected auto, auto:N, cpu, cpu:N or a GPU list like 0,1"
    VISIBLE=$GPUS; NPROC=$(($(tr -cd , <<< "$GPUS" | wc -c) + 1)); WHAT="GPU(s) $GPUS"
    # Named GPUs that torch cannot see would silently train on the CPU (device auto): refuse instead.
    SEEN=$(CUDA_VISIBLE_DEVICES="$GPUS" "$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    [ "$SEEN" -ge "$NPROC" ] || die 3 "--gpus $GPUS: torch sees $SEEN CUDA device(s) there (a CPU-only torch, no driver, or no such GPU); use --gpus cpu (or cpu:N) to train on the CPU" ;;
esac
export CUDA_VISIBLE_DEVICES="$VISIBLE"  # cpu: empty, so the script's device "auto" is the CPU
CORES=$(nproc 2>/dev/null || echo 1)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}"  # cores / processes
# R8 under torchrun: time for every process to finish its step and save after SIGTERM before SIGKILL.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"

NODES=$NNODES
if [ "$DRY" = 1 ] && [ "$NNODES" -gt 1 ]; then
  NODES=1
  echo "launch.sh: the dry run runs on this node's $NPROC process(es) only (NNODES=$NNODES ignored for it)"
fi
WORLD=$((NODES * NPROC))
# R5: another number of processes continues a run exactly when the global micro-batch (train.batch_size x
# processes) is the same: the data order and the schedule depend on it alone.
if [ "$DRY" = 0 ] && [ "$STATUS" = partial ] && [ "$CKPT_WORLD" != "$WORLD" ] && [ "$CKPT_BATCH" != "$((BATCH * WORLD))" ]; then
  OTHER=""
  [ $((CKPT_BATCH % WORLD)) = 0 ] && OTHER=", or keep $WORLD process(es) with -- --set train.batch_size=$((CKPT_BATCH / WORLD)) (the same $CKPT_BATCH windows a micro-batch)"
  die 2 "$RUN_DIR/checkpoints/last.pt (step $CKPT_STEP) was written by $CKPT_WORLD process(es), this launch has $WORLD; the data order and schedule depend on it: relaunch with $CKPT_WORLD process(es) (e.g. --gpus cpu:$CKPT_WORLD or $CKPT_WORLD GPUs)$OTHER, or pass -- --run_dir NEW to start afresh"
fi

# ---------------------------------------------------------------------------------------------------
# 5. The command: plain python for one process; torchrun for several. TORCHRUN is torchrun itself plus
#    two things (it runs as python -c, so ps shows the torchrun arguments): a preemption notice (SIGUSR1) is forwarded to the workers like SIGTERM (R8), and the exit
#    status is the first failed worker's (2 config error, 128+N signal), not torchrun's blanket 1.
export KIT_TORCHRUN='
import logging
import sys
from torch.distributed import run
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
# C3: torchrun logs the first failure and the teardown of the other workers; launch.sh says the first itself
NOISE = ("failed (exitcode", "Sending process", "Closing process")
logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
    lambda record: not str(record.msg).startswith(NOISE))
argv = sys.argv[1:]
if "--signals_to_handle" in {o for a in run.get_args_parser()._actions for o in a.option_strings}:
    argv.insert(0, "--signals_to_handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
try:
    run.main(argv)
except ChildFailedError as err:
    rank, failure = err.get_first_failure()
    code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    if code != 2:  # C3: a config error: the processes said it, in their one line
        print(f"launch.sh: process {rank} exited with status {code} (the first to fail)", file=sys.stderr)
    sys.exit(code)
except SignalException as err:
    sys.exit(128 + int(err.sigval))
'
SCRIPT_CMD=("$SCRIPT" --config "$CONFIG" ${SCRIPT_ARGS[@]+"${SCRIPT_ARGS[@]}"})
if [ "$DRY" = 1 ] && [[ " ${SCRIPT_ARGS[*]-} " != *" --dry_run "* ]]; then SCRIPT_CMD+=(--dry_run); fi
if [ "$WORLD" -eq 1 ]; then
  CMD=("$PY" "${SCRIPT_CMD[@]}")
  SHOWN="${CMD[*]}"
else
  if [ "$NODES" -eq 1 ]; then
    TORCHRUN_ARGS=(--standalone --nproc_per_node="$NPROC")
  else
    TORCHRUN_ARGS=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR"
                   --master_port="${MASTER_PORT:-29500}" --nproc_per_node="$NPROC")
  fi
  CMD=("$PY" -c 'import os; exec(os.environ["KIT_TORCHRUN"])' "${TORCHRUN_ARGS[@]}" "${SCRIPT_CMD[@]}")
  SHOWN="torchrun ${TORCHRUN_ARGS[*]} ${SCRIPT_CMD[*]}"
fi
echo "launch.sh: python $(describe_python)"
echo "launch.sh: $TASK on $WHAT x $NODES node(s) = $WORLD process(es), OMP_NUM_THREADS=$OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES'"
echo "launch.sh: $SHOWN"
[ "$SHOW" = 0 ] || exit 0

# ---------------------------------------------------------------------------------------------------
# 6. Run. Foreground: exec, so the exit status, the signals and the pid are the training's.
#    --detach: a new session immune to hangups, output appended to the run dir's launch.log.
if [ "$DETACH" = 1 ]; then
  LOG="$RUN_DIR/launch$NODE_TAG.log"
  echo "==== $(date '+%Y-%m-%d %H:%M:%S') launch.sh: $SHOWN" >> "$LOG"
  setsid nohup "${CMD[@]}" >> "$LOG" 2>&1 < /dev/null &
  PID=$!
  echo "$PID" > "$LOCK"
  echo "launch.sh: started pid $PID; log $LOG (appended)"
  echo "launch.sh: follow: tail -f $LOG; stop and save: kill $PID; rerun the same command to resume"
  exit 0
fi
if [ "$DRY" = 0 ] && [ "$NO_RUN_DIR" = 0 ]; then echo "$$" > "$LOCK"; fi
exec "${CMD[@]}"
