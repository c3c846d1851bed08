#!/usr/bin/env bash
# The GPU path on a lent GPU machine (benchmarks/gpu_path.py; see benchmarks/README.md), from any directory:
#   benchmarks/gpu_path.sh [gpu_path.py options]          # results in $OUT (default ./gpu-out)
# Wheels in .whl/ (mergelab's dependencies the machine lacks: pydantic, pydantic-core, annotated-types,
# typing-inspection, blake3) are installed into /tmp/site first; mergelab runs from src/ (no install).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
export OUT
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl/ failed" | tee "$OUT/gpu_path.log"; exit 2; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 benchmarks/gpu_path.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_path.log"
exit "${PIPESTATUS[0]}"
