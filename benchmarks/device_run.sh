#!/usr/bin/env bash
# The one script a session that is lent a GPU machine runs there (device tool `run`; README,
# "Benchmarks" gives the exact call), and its rehearsal here:
#
#   bash benchmarks/device_wheels.sh --rehearsal   # once, here: .whl/ (travels) and .whl-rehearse/
#   bash benchmarks/device_run.sh --rehearse       # here, before any device call: must end "rehearsal passed"
#   bash benchmarks/device_run.sh                  # there: command of the device call, carry [".whl"]
#
# The machine (device tool notes, KINDS.md): offline, python3 is CPython 3.12 with torch 2.11 (CUDA
# 13), transformers, safetensors, huggingface_hub, numpy, pillow, pyarrow...; no diffusers, no Ray.
# So: the machine's own torch; the project from the tree on PYTHONPATH (no build backend, no
# dependencies resolved); the carried wheels (.whl/: diffusers and what it needs that is not there)
# installed with pip --no-index into /tmp/site; every requirement of those wheels and of the
# project checked against what is there before anything runs. The GPU path imports no Ray
# (benchmarks/gpu_stage.py runs the feature actor's batch work from diffcut.job.feature_batches).
# Models are random-weight SSD-1B / SDXL architectures built on the GPU (benchmarks/architectures.py):
# no model hub.
#
# Budget: 15 minutes of device time per task, machine starts included, so the call's timeout_s=300
# leaves room for a second start and run. The script ends within DEVICE_RUN_BUDGET=280 s: each step's
# hard limit is the smaller of its own and what the budget leaves: install and checks 45 s each, the
# gpu_stage sweep 150 s (no new setting starts 50 s before its end), the job's feature batches 90 s
# (a 20 s loop after the model build and the auto batch search) with nvidia-smi sampling GPU utilization.
# What comes back is at most 8 files of 16 MiB under $OUT: run.log (progress, environment,
# install, every step's output), gpu_stage.json, gpu_stage.txt, job_stage.json, gpu_util.csv;
# the last step checks that.
#
# --rehearse (here, on CPU): a fresh virtual environment with only local wheels (.whl-rehearse/: this
# machine's stand-ins for the machine's own packages, torch 2.13 CPU for 2.11 CUDA; no Ray), then
# this very script in smoke mode inside a network namespace without network (unshare -n; root only)
# with pip's configuration files ignored, PIP_NO_INDEX=1 and HF_HUB_OFFLINE=1: the same install and
# checks, then gpu_stage.py --meta-check (the published architectures built as on the GPU, meta
# device), --smoke (the tiny model) and --smoke --job-stage. A missing package, an import of Ray or a
# registry access fails it.
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."
ROOT=$PWD
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

if [ "${1:-}" = "--rehearse" ]; then
  # ---------------------------------------------------------------- the rehearsal's machine, here
  RUN="$ROOT/out/rehearse"
  [ -d .whl ] && [ -f .whl-rehearse/requirements.txt ] \
    || { echo "run: bash benchmarks/device_wheels.sh --rehearsal (fills .whl and .whl-rehearse)"; exit 2; }
  rm -rf "$RUN" && mkdir -p "$RUN/OUT"
  export PIP_CONFIG_FILE=/dev/null  # no find-links, index or constraints from this machine's pip configuration
  unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PYTHONPATH
  RPY="${REHEARSAL_PYTHON:-python3}"
  "$RPY" -m venv "$RUN/venv" || { echo "rehearsal: $RPY -m venv failed"; exit 2; }
  "$RUN/venv/bin/python" -m pip install -q --no-index --find-links .whl-rehearse -r .whl-rehearse/requirements.txt \
    > "$RUN/venv-install.log" 2>&1 \
    || { cat "$RUN/venv-install.log"; echo "rehearsal: the stand-in set did not install"; exit 2; }
  if "$RUN/venv/bin/python" -c "import ray" 2>/dev/null; then
    echo "rehearsal: Ray is importable in the venv"; exit 2
  fi
  NET=(unshare -n)
  unshare -n true 2>/dev/null || { NET=(); echo "rehearsal: unshare -n unavailable; offline by settings only"; }
  T0=$(date +%s)
  "${NET[@]}" env OUT="$RUN/OUT" DEVICE_RUN_PYTHON="$RUN/venv/bin/python" DEVICE_RUN_SITE="$RUN/site" \
    DEVICE_RUN_SMOKE=1 DIFFCUT_CACHE="$RUN/cache" bash "$SELF"
  STATUS=$?
  echo "rehearsal: exit $STATUS after $(( $(date +%s) - T0 )) s; \$OUT is $RUN/OUT (run.log there)"
  [ "$STATUS" = 0 ] && echo "rehearsal passed" || echo "rehearsal FAILED"
  exit "$STATUS"
fi

# -------------------------------------------------------------------- the run (there, or rehearsed)
OUT="${OUT:-$ROOT/out/device}"
mkdir -p "$OUT"
PY="${DEVICE_RUN_PYTHON:-python3}"
SITE="${DEVICE_RUN_SITE:-/tmp/site}"
SMOKE="${DEVICE_RUN_SMOKE:-}"
export DIFFCUT_CACHE="${DIFFCUT_CACHE:-/tmp/diffcut-cache}"
LOG="$OUT/run.log"
T0=$(date +%s)
FAILED=()
BUDGET="${DEVICE_RUN_BUDGET:-280}"
# limit CAP RESERVE: CAP seconds, or fewer so that RESERVE seconds of the budget remain after the step (>= 5).
limit() {
  local left=$(( T0 + BUDGET - $(date +%s) - $2 )) n=$1
  [ "$left" -lt "$n" ] && n=$left; [ "$n" -lt 5 ] && n=5; echo "$n"
}
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
step() { local name=$1; shift; echo "---- $name: $*" >> "$LOG"; "$@" >> "$LOG" 2>&1; }
# A benchmark step that fails is recorded and the next one still runs; the exit status says so.
ended() { stamp "$1 exit $2"; [ "$2" = 0 ] || FAILED+=("$1"); }

stamp "start $(date -u +%FT%TZ) $([ -n "$SMOKE" ] && echo '(smoke: CPU, tiny model)')"
{ nvidia-smi 2>&1 | head -20; echo "cores: $(nproc)"; free -g; "$PY" --version; } >> "$LOG" 2>&1

# 1. The carried wheels, without dependencies and without an index; ahead of the machine's own packages.
if ! step "install" timeout "$(limit 45 200)" "$PY" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
  # A wheel of pure Python is a zip of what an install writes: unpacked, it imports and has its metadata.
  stamp "pip install of the carried wheels failed (run.log); unpacking them instead"
  step "unpack" "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
    "$SITE" .whl/*.whl || { stamp "no wheels to unpack: were they carried (carry [\".whl\"])?"; exit 3; }
fi
export PYTHONPATH="$SITE:$ROOT"

# 2. Every requirement of the carried wheels and of the project, against what is installed here.
if ! step "requirements" timeout "$(limit 45 200)" "$PY" - "$SITE" <<'PYEOF'; then
import sys
import tomllib
from importlib import metadata
from packaging.requirements import Requirement

site = sys.argv[1]
needs = [(d.metadata["Name"], r) for d in metadata.distributions(path=[site]) for r in d.requires or []]
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
needs += [("diffcut", r) for r in project["dependencies"]]
missing = []
for owner, text in needs:
    requirement = Requirement(text)
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        continue  # an extra, or another platform or Python
    try:
        version = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        missing.append(f"{owner} needs {text}: not installed")
        continue
    ok = requirement.specifier.contains(version, prereleases=True)
    print(f"{owner}: {text} -> {version}{'' if ok else '  NOT SATISFIED'}")
    if not ok:
        missing.append(f"{owner} needs {text}: {version} installed")
print("\n".join(missing) or "every requirement is met")
sys.exit(1 if missing else 0)
PYEOF
  stamp "a requirement is not met (run.log): carry its wheel (benchmarks/device_wheels.sh)"; exit 3
fi

# 3. The GPU path imports, without Ray.
if ! step "imports" timeout "$(limit 45 200)" "$PY" -c "
import sys, torch, diffusers
import diffcut.method.features, diffcut.job.feature_batches
sys.path.insert(0, 'benchmarks'); import gpu_stage
assert 'ray' not in sys.modules, 'the GPU path imported Ray'
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'from',
      diffusers.__file__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')
"; then
  stamp "the GPU path does not import (run.log)"; exit 3
fi
stamp "installed: $(tail -1 "$LOG")"

if [ -n "$SMOKE" ]; then
  # ------------------------------------------------------------ smoke: the same scripts, on CPU
  step "meta check" timeout 120 "$PY" benchmarks/gpu_stage.py --meta-check; ended "meta check" $?
  timeout 180 "$PY" benchmarks/gpu_stage.py --smoke --json "$OUT/gpu_stage.json" > "$OUT/gpu_stage.txt" 2>&1
  ended "gpu_stage smoke" $?
  step "job stage" timeout 120 "$PY" benchmarks/gpu_stage.py --smoke --job-stage 2 --batch-size auto \
    --json "$OUT/job_stage.json"
  ended "job stage smoke" $?
else
  # ------------------------------------------------------------ the GPU
  # The sweep: SSD-1B then SDXL, float16 then bfloat16, compile off then on; 1024^2 + 3 buckets,
  # batch 1..32. Priority order, so the time limit cuts the least important settings.
  SWEEP=$(limit 150 95)
  stamp "gpu_stage sweep: at most $SWEEP s, no new setting after $(( SWEEP > 70 ? SWEEP - 50 : 20 )) s"
  timeout "$SWEEP" "$PY" benchmarks/gpu_stage.py --time-limit $(( SWEEP > 70 ? SWEEP - 50 : 20 )) \
    --json "$OUT/gpu_stage.json" > "$OUT/gpu_stage.txt" 2>&1
  ended "gpu_stage sweep" $?
  # The job's feature batches (pinned uint8 batches, non-blocking copies, padding to the batch size,
  # buckets mixed), auto batch size, GPU utilization sampled every 0.5 s.
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 > "$OUT/gpu_util.csv" 2>/dev/null &
  SMI=$!
  step "job stage" timeout "$(limit 90 5)" "$PY" benchmarks/gpu_stage.py --job-stage 20 --models ssd-1b \
    --dtypes float16 --compile off --batch-size auto --json "$OUT/job_stage.json"
  ended "job stage" $?
  kill "$SMI" 2>/dev/null; wait "$SMI" 2>/dev/null
  "$PY" - "$OUT/gpu_util.csv" "$OUT/job_stage.json" <<'PYEOF' 2>&1 | tee -a "$LOG"
import csv, datetime, json, sys
job = json.load(open(sys.argv[2]))
util = []
for row in list(csv.reader(open(sys.argv[1])))[1:]:
    try:
        when = datetime.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
        value = float(row[1].strip().split()[0])
    except (ValueError, IndexError):
        continue
    if job["loop_start_unix"] <= when <= job["loop_end_unix"]:  # the timed loop only
        util.append(value)
print(f"job stage: {job['images_per_s']} images/s; GPU utilization mean "
      f"{sum(util) / max(1, len(util)):.0f} % over {len(util)} samples (nvidia-smi clock: local time)")
PYEOF
  tail -n 25 "$OUT/gpu_stage.txt"
fi

# What comes back: at most 8 files, 16 MiB each, named in letters, digits, '.', '_', '-', 2 folders deep.
stamp "done; \$OUT holds:"
ls -l "$OUT" | tee -a "$LOG"
FILES=$(find "$OUT" -type f | wc -l)
BAD=$(find "$OUT" -type f \( -size +16M -o -regex '.*/[^/]*[^A-Za-z0-9._/-][^/]*' \) | wc -l)
DEEP=$(find "$OUT" -mindepth 4 | wc -l)
if [ "$FILES" -gt 8 ] || [ "$BAD" -gt 0 ] || [ "$DEEP" -gt 0 ]; then
  stamp "\$OUT: $FILES files (at most 8), $BAD too large or oddly named, $DEEP too deep: not all of it comes back"
  exit 4
fi
[ ${#FAILED[@]} = 0 ] || { stamp "failed: ${FAILED[*]}"; exit 5; }
stamp "every step ended well"
