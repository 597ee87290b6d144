#!/bin/bash
# Single node, no Slurm: one rank per GPU (or N CPU ranks) under torchrun, with the usual environment.
#   launchers/local.sh NPROC RECIPE [--config-name JOB] [key=value ...]
#   launchers/local.sh 8 recipes/distill.py --config-name mn_minitron_8b teacher.checkpoint=/models/mn12b
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 NPROC RECIPE [--config-name JOB] [key=value ...]" >&2; exit 2; fi
NPROC=$1; shift
cd "$(dirname "$0")/.."
export CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_AVOID_RECORD_STREAMS=1 NCCL_NVLS_ENABLE=0
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$@"
