#!/usr/bin/env bash
# The whole benchmark table in one GPU session (under ten minutes on an H100/H200):
# for each preset, worker-orcd and transformers side by side, with the card's copy bandwidth and
# matmul rate measured in the same process. Tables go to stdout; logs and JSON under $OUT.
#
#   OUT=out benchmarks/run_all.sh            (from the repository root, on the GPU machine)
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
