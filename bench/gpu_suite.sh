#!/usr/bin/env bash
# The GPU suite in one command, for a lent GPU machine (docs/gpu.md): installs the kit that
# tools/gpu_kit.sh gathered here (.gpu_kit/, carried beside the working tree), then runs the GPU tests and
# the benchmarks (bench/gpu_suite.py), each under its own time limit, the whole under 9 minutes.
#
#   bash bench/gpu_suite.sh             # on the GPU machine (its python3)
#   bash bench/gpu_suite.sh --dry-run   # here, on the CPU with .venv's python: tiny shapes, GPU-only parts skipped
#   bash bench/gpu_suite.sh --only tests            # some parts alone (comma-separated keys), the whole budget theirs
#
# Writes $OUT/gpu_suite.json, $OUT/gpu_suite.log and $OUT/parts.tgz (each part's own JSON, pytest's report and
# the GPU tests' recipe logs: the device tool brings back at most 8 files). OUT defaults to runs/gpu_suite;
# PYTHON overrides the interpreter.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
USAGE="usage: bash bench/gpu_suite.sh [--dry-run] [--only KEY[,KEY...]]"
BUDGET_S=530     # the whole command, install included (the device tool allows 600 s)
DRY=""
ONLY=()
while (( $# )); do
    case "$1" in
        --dry-run) DRY="--dry-run" ;;
        --only) [[ $# -ge 2 ]] || { echo "error: --only needs a comma-separated list of parts; $USAGE" >&2; exit 2; }
                ONLY=(--only "$2"); shift ;;
        -h|--help) echo "$USAGE"; exit 0 ;;
        *) echo "error: unknown argument '$1'; $USAGE" >&2; exit 2 ;;
    esac
    shift
done
OUT="${OUT:-runs/gpu_suite}"
mkdir -p "$OUT" || { echo "error: OUT=$OUT cannot be created" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"

# The kit's distributions by name: one already installed (pillow, say) is kept as it is.
kit_names() {
    local f
    for f in .gpu_kit/*.whl; do basename "${f%%-*}"; done | sort -u
}

# Into the running Python's site; where that is not writable, the user site; else a folder on PYTHONPATH.
install_kit() {
    if ! ls .gpu_kit/*.whl >/dev/null 2>&1; then
        echo "[gpu_suite] no .gpu_kit/ here: run 'bash tools/gpu_kit.sh' before the device run and carry .gpu_kit"
        return 0
    fi
    local pip=("$PY" -m pip install -q --no-index --find-links .gpu_kit --no-deps --disable-pip-version-check)
    local names
    names=$(kit_names)
    echo "[gpu_suite] installing the kit: $(echo $names)"
    timeout 120 "${pip[@]}" $names && return 0
    echo "[gpu_suite] the site is not writable: the user site"
    timeout 120 "${pip[@]}" --user $names && return 0
    echo "[gpu_suite] no user site either: .gpu_site on PYTHONPATH"
    timeout 120 "${pip[@]}" --target "$ROOT/.gpu_site" $names || return 1
    export PYTHONPATH="$ROOT/.gpu_site${PYTHONPATH:+:$PYTHONPATH}"
}

main() {
    local start=$SECONDS
    if [[ -n "$DRY" ]]; then
        PY="${PYTHON:-$ROOT/.venv/bin/python}"
    else
        PY="${PYTHON:-python3}"
        install_kit || echo "[gpu_suite] the kit did not install; the parts that need it will fail"
    fi
    export CUDA_DEVICE_MAX_CONNECTIONS=1   # as the container image sets it (Dockerfile)
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" bench/gpu_suite.py $DRY "${ONLY[@]}" --out "$OUT" --budget-s $((BUDGET_S - (SECONDS - start)))
}

# What the parts wrote beside the summary and the log (bench/gpu_suite.py's names), into one archive.
PART_FILES=(mfu.json kd_step_vs_ideal.json kd_vs_hf_loop.json calibration_vs_forward.json
            kd_loss_memory_vs_ce.json offline_vs_student.json gpu_tests.xml test_logs)
bundle() {
    local f present=()
    for f in "${PART_FILES[@]}"; do [[ -e "$OUT/$f" ]] && present+=("$f"); done
    rm -f "$OUT/parts.tgz"
    (( ${#present[@]} )) || return 0
    (cd "$OUT" && tar czf parts.tgz "${present[@]}" && rm -rf "${present[@]}")
}

main 2>&1 | tee "$OUT/gpu_suite.log"
rc="${PIPESTATUS[0]}"
bundle
exit "$rc"
