#!/usr/bin/env bash
# One GPU machine without network, from a plain checkout: install the carried wheels (.whl/, the
# project's dependencies the image lacks), then run the named steps, each under its own time limit,
# logs under $OUT. Steps: tests (the GPU suite), streams-PRESET[-q] (bench --streams 1 8 32 64,
# quantized with -q), tune-MODEL (the small-batch kernels' launch sweep for phi3 or qwen at 8, 32
# and 64 rows), serve-PRESET (serve_load from one client process, 16 and 64 streaming clients,
# against a spawned server on a random bf16 GGUF of that preset written to /tmp). STREAMS sets the
# stream counts (default 1 8 32 64). base-streams-PRESET[-q] runs the same bench on the package in
# $BASE (default base/: another revision's, `git archive REV worker_orcd | tar -x -C base`, left
# untracked so that it travels), for before/after rows on one machine; pairs-streams-PRESET[-q]
# the same bench with the small-batch K-quant weights made in bf16 pairs
# (WORKER_ORCD_QUANT_PAIRS=1, `BatchedConfig.pairs`). kernels-PART runs
# `benchmarks/kernels.py PART` (batch: the decode attention sweep; rows: the few-row kernels').
# ncu-PRESET[-q] runs three eager decode steps at 192 keys (`profile_decode.py --warm-up-only`,
# NCU_BATCH sequences) under ncu and reads the counters of the first NCU_COUNT kernels whose
# names match the regex NCU_KERNELS (whole log under $OUT: stall reasons, occupancy, DRAM).
#
#   OUT=out benchmarks/gpu_session.sh tests streams-phi3-mini streams-qwen2.5-0.5b-q
#   OUT=out benchmarks/gpu_session.sh tune-phi3 serve-phi3-mini
#   STREAMS="1 8" benchmarks/gpu_session.sh base-streams-qwen2.5-0.5b-q streams-qwen2.5-0.5b-q
#   STREAMS="1 8 32 64" benchmarks/gpu_session.sh streams-phi3-mini-q pairs-streams-phi3-mini-q
#   NCU_BATCH=8 NCU_KERNELS="_mm_q4_q5_k|mm_q6_k" NCU_COUNT=4 benchmarks/gpu_session.sh ncu-phi3-mini-q
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WORKER_ORCD_CACHE=${WORKER_ORCD_CACHE:-$PWD/.cache}
PY=${PYTHON:-python3}
if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
LIMIT=${LIMIT:-420}
summary="$OUT/summary.txt"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  env | grep '^WORKER_ORCD_' | grep -v '^WORKER_ORCD_CACHE='; } | tee "$summary"
run() {  # name, command...
    local name=$1; shift
    local t0=$SECONDS
    timeout "$LIMIT" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$summary"
    tail -n 25 "$OUT/$name.log" | tee -a "$summary"
    grep -E "^(FAILED|ERROR)|\] (FAILED|ERROR) " "$OUT/$name.log" | head -n 20 | tee -a "$summary"
}
preset_of() {  # PRESET[-q] -> $preset, and $q: the bench's quantized-weights option for -q
    preset=$1; q=()
    if [[ $preset == *-q ]]; then preset=${preset%-q}; q=(--weights quantized); fi
}
for step in "$@"; do
    case $step in
    # -v: each result with its test's name as it ends, so a run stopped by its limit still names
    # what failed (-q prints a bare F and the names only in the final summary)
    tests) run tests $PY -m pytest -v -m gpu tests --ignore=tests/server -p no:cacheprovider -n 4 \
        --timeout 240 -ra ;;
    streams-* | base-streams-* | pairs-streams-*)
        preset_of "${step#*streams-}"; dir=$PWD; pairs=${WORKER_ORCD_QUANT_PAIRS:-0}
        [[ $step == pairs-* ]] && pairs=1
        if [[ $step == base-* ]]; then
            dir=$(cd "${BASE:-base}" 2>/dev/null && pwd)
            if [ ! -d "$dir/worker_orcd" ]; then
                echo "== $step: no worker_orcd package in ${BASE:-base}" | tee -a "$summary"
                continue
            fi
        fi
        # -m puts the working directory first on the path: the package run is the one in $dir
        run "$step" env -C "$dir" PYTHONPATH="$dir:$PYTHONPATH" WORKER_ORCD_QUANT_PAIRS=$pairs \
            $PY -m worker_orcd.cli bench \
            --preset "$preset" "${q[@]}" --streams ${STREAMS:-1 8 32 64} --prompt-tokens 128 \
            --gen-tokens 128 ;;
    kernels-*) run "$step" $PY benchmarks/kernels.py ${step#kernels-} ;;
    tune-*)
        run "$step" $PY benchmarks/quant_kernels.py --batched --tune --types Q4_K,Q5_K,Q6_K \
            --model "${step#tune-}" --rows 8,32,64 --out "$OUT" ;;
    serve-*)
        preset=${step#serve-}
        run "$step" $PY -m benchmarks.serve_load --spawn --model "/tmp/$preset-bf16.gguf" \
            --random "$preset" --clients 16 64 64 --rounds 4 --fixed --prompt-tokens 128 \
            --gen-tokens 128 --serve-args "--device cuda --max-num-seqs 64 --kv-cache-tokens 65536" \
            --json "$OUT/$step.json" ;;
    ncu-*)  # hardware counters of a decode step's kernels: ncu-PRESET[-q], NCU_KERNELS a regex
        preset_of "${step#ncu-}"
        run "$step" ncu --clock-control none --section SpeedOfLight --section Occupancy \
            --section LaunchStats --section WarpStateStats --section SchedulerStats \
            --section MemoryWorkloadAnalysis \
            --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
            -k "regex:${NCU_KERNELS:-gemv|_mm_|_rows_|_decode_}" -c "${NCU_COUNT:-6}" \
            $PY benchmarks/profile_decode.py --warm-up-only --preset "$preset" "${q[@]}" \
            --context 192 --batch "${NCU_BATCH:-1}" ;;
    *) echo "unknown step $step" | tee -a "$summary" ;;
    esac
done
