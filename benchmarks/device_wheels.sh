#!/usr/bin/env bash
# The Python packages the lent GPU machine lacks, as wheels in .whl/ (git-ignored), for
# benchmarks/device_run.sh: the device call names .whl in `carry` and the script installs them there
# with `pip install --no-index`. Run it here, where a registry is reachable:
#
#   bash benchmarks/device_wheels.sh              # .whl/: what travels to the machine
#   bash benchmarks/device_wheels.sh --rehearsal  # also .whl-rehearse/ (git-ignored, never travels):
#                                                 # this machine's stand-ins for the machine's own set
#
# The machine (device tool notes, KINDS.md, read 2026-11): CPython 3.12 on x86-64, offline, with
# torch 2.11 (CUDA 13), transformers 5.17, huggingface_hub 1.33, safetensors 0.8, accelerate 1.15,
# numpy, scipy, pillow, pyarrow, pandas, threadpoolctl, requests, regex, filelock, packaging and
# more, and no diffusers. diffusers 0.42.1 (constraints.txt's pin) needs filelock,
# huggingface-hub>=1.32,<3, numpy, regex, requests, safetensors>=0.8 and Pillow: all there; and
# importlib_metadata, which is not (it needs zipp>=3.20, whose version there is unknown, and
# lazy-importer). Those four travel, pure Python, at constraints.txt's pins. device_run.sh checks
# every requirement of what it installs against the machine before the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

#: What travels: pinned, pure Python or CPython 3.12 manylinux x86-64.
DEVICE_WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 zipp==4.1.2)
#: The machine's preinstalled set that the GPU path and the tiny smoke model touch, at the machine's
#: versions where KINDS.md gives them; torch is this machine's local CPU build of 2.13 (the machine's
#: 2.11 is a CUDA build: benchmarks/torch_api_check.py checks the GPU path against its sources).
#: Without torchvision and timm: the machine's torchvision matches its torch, and the only one here
#: (a CUDA build of 0.28) breaks transformers' imports beside a CPU torch, which says nothing of the machine.
MACHINE_SET=(torch==2.13.0+cpu transformers==5.17.0 huggingface_hub==1.33.0 accelerate==1.15.0 safetensors==0.8.0
             tokenizers==0.23.2 numpy scipy pillow pyarrow pandas threadpoolctl requests regex filelock packaging)

rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl "${DEVICE_WHEELS[@]}"
ls .whl | sed 's/^/.whl\//'
du -sh .whl

if [ "${1:-}" = "--rehearsal" ]; then
  # For the rehearsal's interpreter (REHEARSAL_PYTHON, else this python3), with their dependencies.
  RPY="${REHEARSAL_PYTHON:-$PY}"
  rm -rf .whl-rehearse && mkdir -p .whl-rehearse
  "$RPY" -m pip download -q --only-binary=:all: -d .whl-rehearse "${MACHINE_SET[@]}"
  printf '%s\n' "${MACHINE_SET[@]}" > .whl-rehearse/requirements.txt
  echo "$(ls .whl-rehearse/*.whl | wc -l) wheels in .whl-rehearse/ ($(du -sh .whl-rehearse | cut -f1))," \
    "for $("$RPY" --version)"
fi
