#!/usr/bin/env bash
# The issue-16 device check, for a session that is lent a GPU: one command, installs nothing.
#
#   run(command="bash bench/gpu_check.sh", timeout_s=600)         # tests, then the benchmark
#   run(command="bash bench/gpu_check.sh bench", timeout_s=420)   # a rerun of one part
#
# The device image's python3 already has every dependency used here (torch, safetensors,
# tokenizers, numpy, pillow, jinja2, huggingface-hub, pytest): the library runs from src/ through
# PYTHONPATH, so there are no wheels to carry. Steps:
#   tests  tests/api/test_cuda.py on the tiny conformance checkpoints (eager and CUDA-graph
#          decoding against the reference tokens, the compiled batch engine alone = batched,
#          GPU + CPU split, reads straight to the GPU, fused vision attention)
#   bench  bench/bench_gpu.py on the real-size 2.6 checkpoint (VERSIONS="2.6 4.5" for both),
#          eager against compiled, 1/4/16/64 conversations
# Logs and JSON go to $OUT (device.txt, tests.log, bench.log, bench.json); bench.json is rewritten
# after every decode mode, so a run cut short by its timeout still returns what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/minicpmv-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
STEP="${1:-all}"
VERSIONS="${VERSIONS:-2.6}"

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
    python3 -c 'import sys, torch, safetensors, tokenizers
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "safetensors", safetensors.__version__, "tokenizers", tokenizers.__version__)'
} 2>&1 | tee "$OUT/device.txt"

status=0
if [ "$STEP" = all ] || [ "$STEP" = tests ]; then
    timeout 200 python3 -m pytest -q -p no:cacheprovider -rfEs tests/api/test_cuda.py 2>&1 | tee "$OUT/tests.log"
    status=$((status | PIPESTATUS[0]))
fi
if [ "$STEP" = all ] || [ "$STEP" = bench ]; then
    # shellcheck disable=SC2086  # VERSIONS is a list of words
    timeout 360 python3 bench/bench_gpu.py --versions $VERSIONS --cache-dir /tmp/minicpmv-bench-gpu \
        --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
    status=$((status | PIPESTATUS[0]))
fi
exit "$status"
