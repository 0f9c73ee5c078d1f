#!/usr/bin/env bash
# FSDP2 scaling on one host: the same per-GPU micro-batch at each GPU count (issue 9's rows).
#   bash benchmarks/run_scaling.sh "1 2 4 8"    # the GPU counts to run (each at most the GPUs visible)
# Rows: FSDP2 LoRA and FSDP2 QLoRA on the Llama-3.1-8B shape, FSDP2 full fine-tuning on the Llama-3.2-1B shape,
# 4 x 2048 tokens per GPU, compiled blocks. Writes $OUT/scaling.jsonl and $OUT/scaling.md (benchmarks/out/ without
# $OUT); the table's efficiency is tokens/s at N GPUs over N x tokens/s at one.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
counts=${1:-"1 2 4 8"}
results="$out/scaling.jsonl"
python - <<'PY'
import sys; sys.path[:0] = ["benchmarks"]
from pathlib import Path
import bench
for shape in ("llama-1b", "llama-8b"):
    bench.random_checkpoint(shape, Path(f"/tmp/peers-hf-checkpoint-{shape}"))
PY
for n in $counts; do
  run() { python benchmarks/bench_distributed.py --devices "$n" --strategy fsdp --batch 4 --seq 2048 --compile "$@"; }
  run --task lora --shape llama-8b 2>>"$out/scaling.err" | tee -a "$results"
  run --task qlora --shape llama-8b 2>>"$out/scaling.err" | tee -a "$results"
  run --task full --shape llama-1b 2>>"$out/scaling.err" | tee -a "$results"
done
python benchmarks/scaling_table.py "$results" | tee "$out/scaling.md"
