#!/usr/bin/env bash
# The CUDA paths in one short run (about 5 minutes on one H100): bf16 training with flash SDPA and fused
# AdamW on a 1.3B-shaped slice, FSDP2 on one GPU through torchrun, compiled training step, KV-cache decode
# eager, compiled (CUDA graphs) and speculative, and the serving engine compiled with a draft (8 rows), each
# checked token for token against eager.
# Prints a table. Usage on a GPU machine: bash benchmarks/gpu_check.sh   (needs torch with CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
$PY -m pip install -q --no-deps -e . 2>/dev/null || true
$PY -m benchmarks.gpu_check
