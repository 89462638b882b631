#!/usr/bin/env bash
# The one script a session that is lent a GPU machine runs there (device tool, `run`):
#
#   run(command="bash benchmarks/device_run.sh", timeout_s=600)
#
# Budget: 15 minutes of device time per session, machine start included (a few minutes), 10
# minutes per command. This script aims at <= 9.5 minutes: install (~2-4 min, registry speed),
# the gpu_stage sweep (--time-limit 240 s: no new setting starts after that; a running setting
# finishes), the job's feature stage for 60 s with nvidia-smi sampling GPU utilization.
# Everything goes under $OUT (the device tool brings it back): gpu_stage.json, gpu_stage.txt,
# job_stage_*.json, gpu_util_*.csv, env.txt, install.log.
#
# The machine reaches package registries only (no model hub): models are random-weight
# SSD-1B / SDXL architectures built on the GPU (benchmarks/architectures.py). torch: the PyPI
# Linux wheel of torch 2.13.0 is the CUDA build (it pulls the nvidia-* runtime wheels, ~3 GB);
# if a CUDA torch is already importable it is used as is. If the registry cannot be reached the
# script stops at install and says so in $OUT/install.log.
set -uo pipefail
OUT="${OUT:-$PWD/out/device}"
mkdir -p "$OUT"
export DIFFCUT_CACHE="$PWD/.cache/diffcut" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/progress.txt"; }

stamp "start $(date -u +%FT%TZ)"
{ nvidia-smi; nproc; free -g; python3 --version; } > "$OUT/env.txt" 2>&1

PY=python3
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  stamp "installing torch (CUDA build) and the project"
  # A venv when the interpreter can make one, else the interpreter's own site-packages.
  if $PY -m venv .venv-gpu >> "$OUT/install.log" 2>&1; then PY=.venv-gpu/bin/python; fi
  $PY -m pip install -q --upgrade pip >> "$OUT/install.log" 2>&1
  if ! $PY -m pip install -q torch==2.13.0 >> "$OUT/install.log" 2>&1; then
    stamp "pip install torch failed (see install.log): no registry? stopping"; exit 3
  fi
fi
# The project with its Ray extra (the job's FeatureStage lives in diffcut.job.pipeline, which imports Ray).
if ! $PY -c "import diffcut.job.pipeline" 2>/dev/null; then
  $PY -m pip install -q -c constraints.txt -e '.[ray]' >> "$OUT/install.log" 2>&1 \
    || { stamp "pip install of the project failed (see install.log)"; exit 3; }
fi
$PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" >> "$OUT/env.txt" 2>&1
stamp "installed: $(tail -1 "$OUT/env.txt")"

# 1. The sweep: SSD-1B then SDXL, float16 then bfloat16, compile off then on; 1024^2 + 3 buckets,
#    batch 1..32. Priority order, so the time limit cuts the least important settings.
stamp "gpu_stage sweep"
timeout 330 $PY benchmarks/gpu_stage.py --time-limit 240 --json "$OUT/gpu_stage.json" \
  > "$OUT/gpu_stage.txt" 2>&1
stamp "gpu_stage exit $?"

# 2. The job's own feature stage (FeatureStage: pinned uint8 batches, non-blocking copies, padding
#    to the batch size, buckets mixed) on synthetic images, 60 s, GPU utilization sampled every 0.5 s.
for batch in auto; do
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 \
    > "$OUT/gpu_util_$batch.csv" 2>/dev/null &
  SMI=$!
  timeout 150 $PY benchmarks/gpu_stage.py --job-stage 60 --models ssd-1b --dtypes float16 --compile off \
    --batch-size "$batch" --json "$OUT/job_stage_$batch.json" > "$OUT/job_stage_$batch.txt" 2>&1
  stamp "job stage ($batch) exit $?"
  kill "$SMI" 2>/dev/null; wait "$SMI" 2>/dev/null
  $PY - "$OUT/gpu_util_$batch.csv" "$OUT/job_stage_$batch.json" <<'PYEOF' | tee -a "$OUT/progress.txt"
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
done
stamp "done"
