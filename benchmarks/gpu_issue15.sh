#!/usr/bin/env bash
# Issue 15's GPU measurements, one phase per call (each fits the device tool's 10-minute call limit):
#
#   bash benchmarks/gpu_issue15.sh sweeps COMMIT    # full corpus, every language, n:2: the compiled ways,
#                                                   # dynamic shapes; recompilations counted
#   bash benchmarks/gpu_issue15.sh static COMMIT    # the same compiled way with static (bucketed) shapes
#   bash benchmarks/gpu_issue15.sh ways COMMIT      # engine apply cost; seed / engine / prefix / compiled ways at n:12
#   bash benchmarks/gpu_issue15.sh tests            # pytest -m gpu
#   bash benchmarks/gpu_issue15.sh autoround COMMIT # one AWQ calibration on the GPU and on the CPU, profiled
#   bash benchmarks/gpu_issue15.sh suite COMMIT     # the full profile of every notebook, 8 workers
#   ONLY=calibration_language bash benchmarks/gpu_issue15.sh suite COMMIT   # one notebook's full profile, alone
#   DETACH=1 ONLY=... bash benchmarks/gpu_issue15.sh suite COMMIT   # start it and return; then, call after call:
#   ONLY=... bash benchmarks/gpu_issue15.sh collect   # wait up to WAIT_S (540) s, return what it wrote so far
#
# Results go to $OUT (default ./gpu-results): the JSON files belong in benchmarks/results/, their
# numbers in benchmarks/README.md. COMMIT is the git commit the working tree was copied from (the
# device machine's copy has no history). Assumes qhelpers and the embedded model are importable: on the
# device tool's machine, `scripts/device_payload.sh` brings the packages and the model there first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
phase=${1:?usage: gpu_issue15.sh sweeps|static|ways|autoround|tests|suite|collect [COMMIT]}
commit=${2:-unknown}
model=embedded:smollm2-135m
label="gpu-full-${ONLY:-workers8}"  # the suite's run, in /tmp: one notebook's (ONLY) or all of them
t0=$(date +%s)
elapsed() { echo "elapsed $(( $(date +%s) - t0 )) s"; }

case "$phase" in
sweeps)
    nvidia-smi --query-gpu=name,memory.used --format=csv
    python -c "from qhelpers.models.loading import load_model; load_model('$model', device='cpu')" 2>&1 | tail -1
    TORCH_LOGS=recompiles timeout 330 python benchmarks/sweep_benchmark.py --model $model --device cuda --dtype fp16 \
        --n-texts 50 --langs all --layers n:2 --ways engine,engine+prefix,engine+compile,engine+prefix+compile \
        --commit "$commit" --out "$OUT/sweep_gpu_smollm2_fp16_full_compile.json" 2>&1 | tee "$OUT/sweep_full.log" \
        | grep -v "__recompiles" | tail -45
    echo "recompilations: $(grep -c '__recompiles\] Recompiling' "$OUT/sweep_full.log")"
    elapsed ;;
static)
    timeout 220 python benchmarks/sweep_benchmark.py --model $model --device cuda --dtype fp16 \
        --n-texts 50 --langs all --layers n:2 --ways engine+compile --floor-repeats 2 --compile-shapes static \
        --commit "$commit" --out "$OUT/sweep_gpu_smollm2_fp16_full_compile_static.json" 2>&1 | tail -22
    elapsed ;;
ways)
    timeout 60 python benchmarks/engine_apply_benchmark.py --device cuda --dtype fp16 \
        --out "$OUT/engine_apply_gpu_smollm2_fp16.json" 2>&1 | grep -v Converting | tail -3
    timeout 480 python benchmarks/sweep_benchmark.py --model $model --device cuda --dtype fp16 \
        --n-texts 50 --layers n:12 --ways seed,engine,engine+prefix,engine+compile,engine+prefix+compile \
        --commit "$commit" --out "$OUT/sweep_gpu_smollm2_fp16_ways_compile.json" 2>&1 | tee "$OUT/sweep_ways.log" | tail -32
    elapsed ;;
autoround)
    timeout 300 python benchmarks/autoround_benchmark.py --dtype fp16 --devices cuda,cpu --top 12 --commit "$commit" \
        --out "$OUT/autoround_gpu_smollm2_fp16.json" 2>&1 | grep -v "WARNING\|INFO\|Quantiz\|Converting\|^\s*$" | tail -32
    elapsed ;;
tests)
    # without the project's addopts: they need nbval, which GPU tests do not; only the files that hold GPU
    # tests (others import jupytext or import-linter, which the GPU machine lacks)
    timeout 540 python -m pytest -q -rs -m gpu -o addopts="" -p no:cacheprovider $(grep -l "mark.gpu" tests/test_*.py) \
        2>&1 | tee "$OUT/pytest_gpu.log" | tail -8
    elapsed ;;
suite)
    # the run's folder stays in /tmp (the device tool returns at most 8 files); `collect` returns its
    # run.json files, logs and executed notebooks as one tgz
    if [ -n "${ONLY:-}" ]; then select=(--only "$ONLY" --workers 1); else select=(--workers 8); fi
    run=(python benchmarks/suite_benchmark.py --label "$label" --commit "$commit" --out "/tmp/suite_$label.json"
         -- --profile "${SUITE_PROFILE:-full}" "${select[@]}" --device "${SUITE_DEVICE:-cuda}" -p DTYPE "${SUITE_DTYPE:-fp16}")
    if [ -n "${DETACH:-}" ]; then
        # for a run longer than one call: start it in its own session and return; later calls (back to
        # back, or the machine is released) run `collect`, which waits up to WAIT_S seconds each
        setsid nohup "${run[@]}" > "/tmp/suite_$label.log" 2>&1 < /dev/null &
        echo $! > "/tmp/suite_$label.pid"
        echo "started detached: pid $(cat "/tmp/suite_$label.pid"), log /tmp/suite_$label.log"
        elapsed
        exit 0
    fi
    # stop the runner before the call's limit, so that what completed still comes back (the pkill
    # pattern must not match this call's own command line: run the phase from this script)
    ( sleep "${SUITE_S:-520}"; pkill -TERM -f run_all.py ) &
    "${run[@]}" > "/tmp/suite_$label.log" 2>&1
    ;&  # then collect what it wrote
collect)
    pidfile="/tmp/suite_$label.pid"
    if [ "$phase" = collect ] && [ -f "$pidfile" ]; then
        waited=0
        while kill -0 "$(cat "$pidfile")" 2>/dev/null && [ "$waited" -lt "${WAIT_S:-540}" ]; do
            sleep 5; waited=$((waited + 5))
        done
        kill -0 "$(cat "$pidfile")" 2>/dev/null && echo "still running after ${waited} s: run collect again"
    fi
    grep -v "^\s*$" "/tmp/suite_$label.log" | tail -40
    cp "/tmp/suite_$label.log" "$OUT/suite_full.log" 2>/dev/null
    cp "/tmp/suite_$label.json" "$OUT/" 2>/dev/null
    # the executed notebooks too: papermill records each finished cell's duration, also of a stopped notebook
    tar czf "$OUT/suite_full_run.tgz" /tmp/suite_"$label"-run/*/run.json /tmp/suite_"$label"-run/*/*.log \
        /tmp/suite_"$label"-run/*/*.ipynb 2>/dev/null
    elapsed ;;
*)
    echo "unknown phase $phase: sweeps, static, ways, autoround, tests, suite or collect" >&2
    exit 2 ;;
esac
