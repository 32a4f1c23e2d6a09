#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): training throughput (bf16/fp16 AMP, channels-last),
# torchrun + NCCL SyncBatchNorm, exact resume, eager vs torch.compile latency; one markdown
# table at the end. Under 8 minutes on one H200.
#
#   scripts/gpu_check.sh              on a CUDA machine
#   scripts/gpu_check.sh --dry-run    on a CPU, tiny sizes (same as DEEPLAB_GPU_CHECK_CPU=1)
#
# Other arguments go to gpu_check.py (--phases abcd, --no-compile, --keep).
# DEEPLAB_GPU_CHECK_SKIP_INSTALL=1 skips the pip step.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${DEEPLAB_GPU_CHECK_SKIP_INSTALL:-0}" != 1 ]]; then
    if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        # A CUDA torch is installed: keep it (constraints.txt pins the CPU 2.13.0 wheel).
        echo "gpu_check: CUDA torch $(python -c 'import torch; print(torch.__version__)') found; installing deeplab without deps"
        pip install --no-deps -e . \
            || pip install --no-deps --no-build-isolation -e . \
            || echo "gpu_check: pip could not install deeplab (offline?); using PYTHONPATH=src"
        if ! python -c "import numpy, PIL, tqdm, yaml" 2>/dev/null; then
            pip install "numpy>=1.22" "pillow>=9.0" "tqdm>=4.60" "pyyaml>=6.0"
        fi
    else
        pip install -c constraints.txt -e . || echo "gpu_check: pip install failed; using PYTHONPATH=src"
    fi
fi
# This checkout's package wins over any other install (gpu_check.py passes it on to children).
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec python scripts/gpu_check.py "$@"
