#!/usr/bin/env bash
# CPU SUITE (issue 6): gptjax against the PyTorch reference on this machine's CPU, as JSON.
#
#   bash benchmarks/cpu_suite.sh [STAGE...]        # from the repository root
#
# Stages (default: all; about 20 minutes on 2 cores). Every gptjax figure is train.py's
# step for the preset's recipe, float32 unless the stage says otherwise. The reference is
# HF GPT2LMHeadModel in the same precision as gptjax (float32, or bf16 autocast against
# bfloat16: never one against the other), every variant torch has here (eager and
# torch.compile, each with AdamW foreach and fused; a variant that cannot run is reported
# with the reason), the same thread count, timed in rounds alternating with gptjax in one
# process; the speed-up is against the fastest variant.
#
#   char      the character-level recipe (4 x 128, context 64, batch 12): vs the
#             reference, and with scanned layers instead of the preset's unrolled ones
#   6x384     6 layers x 384, context 256, batch 12 (the cpu-6x384 recipe): the same two
#   small     train.py's default (cpu-small: 4 x 192, BPE 4096, context 128, batch 16)
#   bf16      6x384 and char in bfloat16 (float32 accumulation, float32 master weights)
#             vs the reference under bf16 autocast
#   compile   trace + compile time of the 12-layer gpt2 training step (batch 8 x 1024),
#             scanned (the preset's default) and unrolled
#
# Quiet machine wanted: the two frameworks share the load, but absolute times do not.
# Output: $OUT or ./cpu_results: suite.json, suite.log and summary.txt (benchmarks/summarize.py).
set -uo pipefail

OUT_DIR=${OUT:-cpu_results}
source "$(dirname "$0")/common.sh"
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(char 6x384 small bf16 compile)

for stage in "${STAGES[@]}"; do
    case $stage in
        char)
            run_bench char 600 --preset char --batch-size 12 --reference --rounds 5
            run_bench char_scan 300 --preset char --batch-size 12 --scan --rounds 3 ;;
        6x384)
            run_bench 6x384 1200 --preset cpu-6x384 --batch-size 12 --reference --rounds 3 \
                --steps 5 --warmup 2
            run_bench 6x384_scan 300 --preset cpu-6x384 --batch-size 12 --scan --rounds 2 \
                --steps 5 --warmup 2 ;;
        small)
            run_bench small 600 --preset cpu-small --batch-size 16 --reference --rounds 3 \
                --steps 10
            run_bench small_scan 300 --preset cpu-small --batch-size 16 --scan --rounds 3 \
                --steps 10 ;;
        bf16)
            run_bench 6x384_bf16 1200 --preset cpu-6x384 --batch-size 12 --dtype bfloat16 \
                --reference --rounds 3 --steps 5 --warmup 2
            run_bench char_bf16 600 --preset char --batch-size 12 --dtype bfloat16 \
                --reference --rounds 5 ;;
        compile)
            run_bench gpt2_compile 300 --preset gpt2 --batch-size 8 --compile-only
            run_bench gpt2_compile_unrolled 300 --preset gpt2 --batch-size 8 --no-scan \
                --compile-only ;;
        *) log "unknown stage $stage (char, 6x384, small, bf16, compile)"; exit 2 ;;
    esac
done

summarize
