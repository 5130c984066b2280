#!/usr/bin/env bash
# ============================================================================================
# GPU SUITE (issue 6): gptjax against the PyTorch reference on one NVIDIA GPU, as JSON.
# Not run in CI and not yet run at all: written on a CPU-only machine, to be run on an H100.
# ============================================================================================
#
#   bash benchmarks/gpu_suite.sh [STAGE...]        # from the repository root
#
# Stages (default: all four, about 12 minutes on an H100 with 16 CPU cores, most of it
# compiling; run them in separate calls where one call is limited to 10 minutes):
#
#   main      GPT-2 124M (gpt2 preset), batch 16 x 1024, bf16, no dropout: gptjax (cudnn
#             attention, scan over layers) and the reference (HF GPT2LMHeadModel, bf16
#             autocast, torch.compile, SDPA flash attention, fused AdamW, TF32), then gptjax
#             again to show the persistent compilation cache (compile_s)      ~5 min
#   variants  one change each, gptjax only: unrolled layers, remat, xla attention, the
#             latency-hiding scheduler flag, vocabulary 50304 (nanoGPT's padding)  ~4 min
#   maxbatch  the largest batch x 1024 that fits (GPU memory fraction 0.95): 24, 32, 48, 64,
#             96, 128, stopping at the first that fails                   ~3 min
#   env       versions and the card (also written by every other stage)
#
# A dry run of the plumbing on a CPU: SUITE_PRESET=tiny SUITE_CTX=32 bash benchmarks/gpu_suite.sh main
#
# Output: $OUT (the device tool's folder) or ./gpu_results: gpu_suite.json (every run's
# full JSON, keyed by run name), suite.log (everything printed) and summary.txt (a table).
# Targets (issue 6): gptjax >= 1.3x the reference's tokens/s in `main`, and >= 47% MFU by
# the causal formula (about 590k tokens/s at 989 TFLOP/s).
set -uo pipefail

OUT_DIR=${OUT:-gpu_results}
RUNS="$OUT_DIR/runs"
LOG="$OUT_DIR/suite.log"
PY=${PYTHON:-python3}
CACHE=${GPTJAX_JAX_CACHE:-/tmp/gptjax-jax-cache}
PRESET=${SUITE_PRESET:-gpt2}
CTX=${SUITE_CTX:-1024}
mkdir -p "$RUNS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env main variants maxbatch)

log() { echo "$*" | tee -a "$LOG"; }

# bench NAME TIMEOUT_S ARGS...: one `python -m gptjax.bench` run of the gpt2 preset at
# context 1024 without dropout (nanoGPT's setting), its JSON in $RUNS/NAME.json.
bench() {
    local name=$1 limit=$2
    shift 2
    log "=== $name: $*"
    timeout "$limit" "$PY" -m gptjax.bench --preset "$PRESET" --n-ctx "$CTX" --dropout 0 \
        --cache-dir "$CACHE" "$@" --json "$RUNS/$name.json" >"$RUNS/$name.log" 2>&1
    local status=$?
    cat "$RUNS/$name.log" >>"$LOG"
    grep -E "^  (gptjax|pytorch)" "$RUNS/$name.log" || tail -n 3 "$RUNS/$name.log"
    rm -f "$RUNS/$name.log"
    [ $status -ne 0 ] && log "--- $name failed with status $status"
    return $status
}

env_stage() {
    log "=== env $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
        2>&1 | tee -a "$LOG"
    "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import jax, optax, torch, transformers
print("jax", jax.__version__, jax.devices(), "| optax", optax.__version__, "| torch",
      torch.__version__, torch.version.cuda, "| transformers", transformers.__version__)
EOF
}

main_stage() {
    bench main_b16 480 --batch-size 16 --reference --rounds 3 --steps 10
    bench main_b16_cached 240 --batch-size 16 --rounds 1 --steps 10
}

variants_stage() {
    bench var_unrolled 200 --batch-size 16 --no-scan --rounds 2 --steps 10
    bench var_remat 200 --batch-size 16 --remat --rounds 2 --steps 10
    bench var_xla_attention 200 --batch-size 16 --attention xla --rounds 2 --steps 10
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true" \
        bench var_lhs 200 --batch-size 16 --rounds 2 --steps 10
    bench var_vocab50304 200 --batch-size 16 --vocab-size 50304 --rounds 2 --steps 10
}

maxbatch_stage() {
    local b
    for b in 24 32 48 64 96 128; do
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
            bench "maxbatch_b$b" 200 --batch-size "$b" --rounds 1 --steps 5 || break
    done
}

for stage in "${STAGES[@]}"; do
    case $stage in
        env) env_stage ;;
        main) main_stage ;;
        variants) variants_stage ;;
        maxbatch) maxbatch_stage ;;
        *) log "unknown stage $stage (env, main, variants, maxbatch)"; exit 2 ;;
    esac
done

# Gather every run into one JSON file and print a table (the device tool returns 8 files).
"$PY" - "$OUT_DIR" <<'EOF' | tee "$OUT_DIR/summary.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
merged_path = out / "gpu_suite.json"
merged = json.loads(merged_path.read_text()) if merged_path.exists() else {}
for path in sorted((out / "runs").glob("*.json")):
    merged[path.stem] = json.loads(path.read_text())
    path.unlink()
merged_path.write_text(json.dumps(merged, indent=1))
print(f"{'run':20s} {'batch':>5s} {'step ms':>8s} {'tok/s':>9s} {'MFU causal':>10s} "
      f"{'compile s':>9s} {'peak GiB':>8s}  pytorch ms / speed-up")
for name, r in merged.items():
    j = r.get("gptjax", {})
    mem = j.get("memory", {}).get("peak_bytes_in_use_mb", float("nan")) / 1024
    nan = float("nan")
    line = (f"{name:20s} {r['batch_size']:5d} {j.get('step_ms', {}).get('median', nan):8.2f} "
            f"{j.get('tokens_per_s', nan):9.0f} {100 * j.get('mfu_causal', nan):9.1f}% "
            f"{j.get('compile_s', nan):9.1f} {mem:8.1f}")
    if "pytorch" in r:
        p = r["pytorch"]
        line += f"  {p['step_ms']['median']:.2f} ms, {r['speedup']:.2f}x"
    print(line)
EOF
