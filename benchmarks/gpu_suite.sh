#!/usr/bin/env bash
# ============================================================================================
# GPU SUITE (issue 6): gptjax against the PyTorch reference on one NVIDIA GPU, as JSON.
# Not run in CI. Run on an H200 on 2026-11-30 (stages env main kernels job tests, with
# SUITE_ROUNDS=2 SUITE_REF_ADAMW=fused): benchmarks/results/h200-2026-11-30/.
# ============================================================================================
#
#   bash benchmarks/gpu_suite.sh [STAGE...]        # from the repository root
#
# Stages (default: all four, about 12 minutes on an H100 with 16 CPU cores, most of it
# compiling; run them in separate calls where one call is limited to 10 minutes):
#
#   main      GPT-2 124M (gpt2 preset), batch 16 x 1024, bf16, no dropout: gptjax (cudnn
#             attention, scan over layers) and the reference (HF GPT2LMHeadModel, bf16
#             autocast, SDPA flash attention, TF32; eager and torch.compile, each with
#             AdamW foreach and fused, the speed-up against the fastest), then gptjax
#             again to show the persistent compilation cache (compile_s)      ~6 min
#   variants  one change each, gptjax only: unrolled layers, remat, xla attention, the
#             latency-hiding scheduler flag, vocabulary 50304 (nanoGPT's padding)  ~4 min
#   maxbatch  the largest batch x 1024 that fits (GPU memory fraction 0.95): 24, 32, 48, 64,
#             96, 128, stopping at the first that fails                   ~3 min
#   kernels   gptjax only, the same step with --kernels fast (every kernel: the CPU-tuned
#             custom VJPs and cudnn attention) and --kernels reference (model.py's
#             formulas, XLA attention), against `main`'s "auto"         ~2 min
#   job       the default training job (python train.py: cpu-small on the built-in corpus,
#             600 steps) on the GPU, its log and final validation loss  ~1 min
#   tests     the kernel tests (tests/test_kernels.py) on the GPU        ~1 min
#   env       versions and the card (also written by every other stage)
#
# A dry run of the plumbing on a CPU: SUITE_PRESET=tiny SUITE_CTX=32 bash benchmarks/gpu_suite.sh main
#
# Output: $OUT (the device tool's folder) or ./gpu_results: suite.json (every run's
# full JSON, keyed by run name), suite.log (everything printed) and summary.txt (a table).
# Targets (issue 6): gptjax >= 1.3x the reference's tokens/s in `main`, and >= 47% MFU by
# the causal formula (about 590k tokens/s at 989 TFLOP/s).
set -uo pipefail

OUT_DIR=${OUT:-gpu_results}
source "$(dirname "$0")/common.sh"
CACHE=${GPTJAX_JAX_CACHE:-/tmp/gptjax-jax-cache}
PRESET=${SUITE_PRESET:-gpt2}
CTX=${SUITE_CTX:-1024}
# Within one 10-minute call: SUITE_ROUNDS=2 SUITE_REF_ADAMW=fused (torch's fastest AdamW
# on CUDA) keep `main` to about 4 minutes.
ROUNDS=${SUITE_ROUNDS:-3}
REF_ADAMW=${SUITE_REF_ADAMW:-all}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env main variants maxbatch)

# bench NAME TIMEOUT_S ARGS...: the gpt2 preset at context 1024 without dropout
# (nanoGPT's setting), sharing one persistent compilation cache.
bench() {
    local name=$1 limit=$2
    shift 2
    run_bench "$name" "$limit" --preset "$PRESET" --n-ctx "$CTX" --dropout 0 \
        --cache-dir "$CACHE" "$@"
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
    bench main_b16 330 --batch-size 16 --reference --rounds "$ROUNDS" --steps 10 \
        --ref-adamw "$REF_ADAMW"
    bench main_b16_cached 100 --batch-size 16 --rounds 1 --steps 10
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

kernels_stage() {
    bench kernels_fast 150 --batch-size 16 --kernels fast --rounds 2 --steps 10
    bench kernels_reference 150 --batch-size 16 --kernels reference --rounds 2 --steps 10
}

job_stage() {
    log "=== job: python train.py on $(date -u +%FT%TZ)"
    local start=$SECONDS
    timeout 200 "$PY" train.py --out-dir /tmp/gptjax-default-run 2>&1 | tail -n 25 | tee -a "$LOG"
    log "--- job: $((SECONDS - start)) s wall"
}

tests_stage() {
    log "=== tests: tests/test_kernels.py on $(date -u +%FT%TZ)"
    timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 |
        tail -n 40 | tee -a "$LOG"
}

for stage in "${STAGES[@]}"; do
    case $stage in
        env) env_stage ;;
        main) main_stage ;;
        variants) variants_stage ;;
        maxbatch) maxbatch_stage ;;
        kernels) kernels_stage ;;
        job) job_stage ;;
        tests) tests_stage ;;
        *) log "unknown stage $stage (env, main, variants, maxbatch, kernels, job, tests)"; exit 2 ;;
    esac
done

summarize
