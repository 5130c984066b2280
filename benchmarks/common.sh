# Shared by cpu_suite.sh and gpu_suite.sh (sourced, not run). Before sourcing, set
# OUT_DIR (where suite.json, suite.log and summary.txt go).
RUNS="$OUT_DIR/runs"
LOG="$OUT_DIR/suite.log"
PY=${PYTHON:-python3}
mkdir -p "$RUNS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

log() { echo "$*" | tee -a "$LOG"; }

# run_bench NAME TIMEOUT_S ARGS...: one `python -m gptjax.cli.bench ARGS` run, its JSON in
# $RUNS/NAME.json, its output appended to the log and its result lines printed.
run_bench() {
    local name=$1 limit=$2
    shift 2
    log "=== $name: $*"
    timeout "$limit" "$PY" -m gptjax.cli.bench "$@" --json "$RUNS/$name.json" \
        >"$RUNS/$name.log" 2>&1
    local status=$?
    cat "$RUNS/$name.log" >>"$LOG"
    grep -E "^  (gptjax|pytorch|torch.compile|AdamW fused|no ratio)" "$RUNS/$name.log" ||
        tail -n 3 "$RUNS/$name.log"
    rm -f "$RUNS/$name.log"
    [ $status -ne 0 ] && log "--- $name failed with status $status"
    return $status
}

# The table of every run so far (benchmarks/summarize.py), also in summary.txt.
summarize() {
    "$PY" benchmarks/summarize.py "$OUT_DIR" | tee "$OUT_DIR/summary.txt"
}
