#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, gathered here into .gpu_kit/ (ignored by git, carried to the
# device run beside the working tree; bench/gpu_suite.sh installs them there with --no-index).
#
#   bash tools/gpu_kit.sh            # megatron-core 0.16.1 (requirements.lock's pin: the whole suite runs on it)
#   MCORE_VERSION=0.19.2 bash tools/gpu_kit.sh   # the other tested end (requirements-mcore019.txt)
#
# The GPU machine: Python 3.12, torch + CUDA, transformers and pytest installed, no network. Our run-time
# imports beyond those, at requirements.lock's versions (the others at .venv's):
#   * megatron-core (numpy, packaging, torch: present);
#   * hydra-core, omegaconf, antlr4-python3-runtime (PyYAML and packaging come with transformers);
#   * matplotlib and its dependencies but numpy and packaging (pruning writes importance.png);
#   * psutil (accelerate brings it into .venv): Megatron-Core's checkpoint writer processes need it; without
#     it they die and the job waits for them forever (found by running the suite in a virtualenv holding
#     torch, transformers and pytest alone, plus this kit).
# gguf, lm-eval, datasets and nltk are imported only by what the suite does not run (the SmolLM2 assets,
# lm-eval tasks, chat data, IFEval).
#
# megatron-core ships CPython-specific wheels (a compiled dataset helper) tagged manylinux_2_28, so that
# platform is asked for besides manylinux2014 / manylinux_2_17; antlr4-python3-runtime 4.9.3 is an sdist
# only on PyPI: built here into a (pure Python) wheel.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="$ROOT/.gpu_kit"
PY="${PY:-$ROOT/.venv/bin/python}"
MCORE_VERSION="${MCORE_VERSION:-0.16.1}"
LIMIT_MIB=60
WHEELS=("megatron-core==$MCORE_VERSION" "hydra-core==1.3.8" "omegaconf==2.3.0"
        "matplotlib==3.11.2" "contourpy==1.3.3" "cycler==0.12.1" "fonttools==4.68.0" "kiwisolver==1.5.1"
        "pillow==13.0.0" "pyparsing==3.3.3" "python-dateutil==2.9.0.post0" "six==1.17.0" "psutil==7.2.2")
SDISTS=("antlr4-python3-runtime==4.9.3")

rm -rf "$KIT"
mkdir -p "$KIT"
"$PY" -m pip download -q --dest "$KIT" --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any --no-deps "${WHEELS[@]}"
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
"$PY" -m pip download -q --dest "$build" --no-binary=:all: --no-deps "${SDISTS[@]}"
"$PY" -m pip wheel -q --no-deps --wheel-dir "$KIT" "$build"/*.tar.gz

ls -l "$KIT"
bytes=$(du -cb "$KIT"/*.whl | tail -1 | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.2f", b / 1048576 }')
echo "gpu kit: $(ls "$KIT"/*.whl | wc -l) wheels, $bytes bytes ($mib MiB) in $KIT"
if (( bytes > LIMIT_MIB * 1048576 )); then
    echo "error: the kit is over $LIMIT_MIB MiB (a device run carries at most 64 MiB of ignored files)" >&2
    exit 1
fi
