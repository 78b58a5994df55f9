#!/usr/bin/env bash
# The whole benchmark table in one GPU session (under ten minutes on an H100/H200):
# for each preset, worker-orcd and transformers side by side, with the card's copy bandwidth and
# matmul rate measured in the same process; with QUANTIZED=1, then each preset's random
# Q4_K_M-style mix (GGUF blocks on the GPU; no peer runs those). Tables go to stdout; logs and JSON
# under $OUT.
#
#   OUT=out [QUANTIZED=1] benchmarks/run_all.sh [bench flags]   (repository root, GPU machine)
set -euo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ! command -v worker-orcd >/dev/null; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
date -u | tee "$OUT/date.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
for preset in qwen2.5-0.5b phi3-mini; do
    echo "== $preset"
    $PY -m worker_orcd.cli bench --preset "$preset" --peer transformers \
        --json "$OUT/bench-$preset.json" "$@" 2> "$OUT/bench-$preset.log" \
        | tee "$OUT/bench-$preset.txt"
done
if [ "${QUANTIZED:-0}" = 1 ]; then
    for preset in qwen2.5-0.5b phi3-mini; do
        echo "== $preset, quantized"
        $PY -m worker_orcd.cli bench --preset "$preset" --weights quantized \
            --json "$OUT/bench-$preset-q.json" "$@" 2> "$OUT/bench-$preset-q.log" \
            | tee "$OUT/bench-$preset-q.txt"
    done
fi
