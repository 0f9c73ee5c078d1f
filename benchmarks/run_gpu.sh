#!/usr/bin/env bash
# Runs litft's benchmark and the peers' in ONE GPU command, so the ratios compare one machine at one time.
# Needs: .site (../shared/gpu/make-site.sh) and .bench/peers.py (a copy of ../shared/bench/peers.py) carried along.
#   bash benchmarks/run_gpu.sh [ROWS]   ROWS: a space-separated subset of:
#        lora1b lora8b ckpt8b qlora8b decode8b longest dpo1b        (dpo1b has no peer: peers.py has no DPO task)
#        fp8lora1b fp8lora8b fp8ckpt8b   litft's float8 base; the table sets them beside the peers' lora rows
#        loramoe qloramoe    Qwen3-30B-A3B's geometry on 12 layers (a 16 GB checkpoint); peers from peers_moe.py
#   PEERS=unsloth,hf,litgpt (default: unsloth, the fastest and leanest peer)
# A row named several times runs that many times, litft then the peers each time ("lora8b qlora8b lora8b qlora8b"):
# the table gives each run's ratio and their median (a ratio near its target needs more than one run).
# Each row runs litft and then its peers on the same GPU (GPUs differ by a few percent in clock and power: measured
# 2-5% between two H200s of one host); with several GPUs visible the rows are dealt out over them and run at once.
# Writes $OUT/results.jsonl and $OUT/table.md (or ./benchmarks/out/ without $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
rows=${1:-"lora1b lora8b ckpt8b qlora8b fp8lora1b fp8lora8b fp8ckpt8b decode8b longest"}
peers=${PEERS:-unsloth}
results="$out/results.jsonl"
gpus=$(python -c "import torch; print(torch.cuda.device_count())")

# Both sides read the same random checkpoints: write them once, before anything runs in parallel.
python - "$rows" <<'PY'
import sys; sys.path[:0] = ["benchmarks", ".bench"]
from pathlib import Path
import bench, peers
for shape in ("llama-1b", "llama-8b"):
    folder = f"/tmp/peers-hf-checkpoint-{shape}"
    bench.random_checkpoint(shape, Path(folder))
    peers.saved_checkpoint(peers.SHAPES[shape], folder)
if "moe" in sys.argv[1]:
    bench.random_checkpoint("qwen3-moe", Path("/tmp/peers-hf-checkpoint-qwen3-moe"))
PY

# The first heavy run on a freshly started machine has run 6-15% slow (NOTES.md, sections 11, 16, 17; not understood),
# and the rows measured since were all preceded by other GPU work in their call: so is every row here, by ~15 s of
# bf16 GEMMs on each GPU first.
python - <<'PY'
import time, torch
for index in range(torch.cuda.device_count()):
    with torch.cuda.device(index):
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        began = time.perf_counter()
        while time.perf_counter() - began < 15:
            for _ in range(50):
                a @ a
            torch.cuda.synchronize()
PY

litft_row() {
    case $1 in
      lora1b)   python benchmarks/bench.py --task lora --shape llama-1b --batch 8 --seq 2048 --compile ;;
      lora8b)   python benchmarks/bench.py --task lora --shape llama-8b --batch 4 --seq 2048 --compile ;;
      ckpt8b)   python benchmarks/bench.py --task lora --shape llama-8b --batch 8 --seq 2048 --ckpt --offload --compile ;;
      qlora8b)  python benchmarks/bench.py --task qlora --shape llama-8b --batch 4 --seq 2048 --compile ;;
      decode8b) python benchmarks/bench.py --task decode --shape llama-8b --prompt 128 --new 256 --compile ;;
      longest)  python benchmarks/longest_sequence.py --peer litft --seqs 16384,32768,65536 --mlp_tile_tokens 8192 ;;
      dpo1b)    python benchmarks/bench.py --task dpo --shape llama-1b --batch 4 --seq 1024 --compile ;;
      fp8lora1b) python benchmarks/bench.py --task qlora --quantize fp8 --shape llama-1b --batch 8 --seq 2048 --compile ;;
      fp8lora8b) python benchmarks/bench.py --task qlora --quantize fp8 --shape llama-8b --batch 4 --seq 2048 --compile ;;
      fp8ckpt8b) python benchmarks/bench.py --task qlora --quantize fp8 --shape llama-8b --batch 8 --seq 2048 --ckpt --offload --compile ;;
      loramoe)  python benchmarks/bench.py --task lora --shape qwen3-moe --batch 4 --seq 2048 --compile ;;
      qloramoe) python benchmarks/bench.py --task qlora --shape qwen3-moe --batch 4 --seq 2048 --compile ;;
    esac
}
peer_row() {
    case $1 in
      lora1b)   python .bench/peers.py --peers "$peers" --task lora --shape llama-1b --batch 8 --seq 2048 ;;
      lora8b)   python .bench/peers.py --peers "$peers" --task lora --shape llama-8b --batch 4 --seq 2048 ;;
      ckpt8b)   python .bench/peers.py --peers "$peers" --task lora --shape llama-8b --batch 8 --seq 2048 --ckpt ;;
      qlora8b)  python .bench/peers.py --peers "$peers" --task qlora --shape llama-8b --batch 4 --seq 2048 ;;
      decode8b) python .bench/peers.py --peers "$peers" --task decode --shape llama-8b --prompt 128 --new 256 ;;
      longest)  python benchmarks/longest_sequence.py --peer unsloth --seqs 16384,32768,65536 ;;
      loramoe)  python benchmarks/peers_moe.py --peers "$peers" --task lora --checkpoint /tmp/peers-hf-checkpoint-qwen3-moe ;;
      qloramoe) python benchmarks/peers_moe.py --peers "$peers" --task qlora --checkpoint /tmp/peers-hf-checkpoint-qwen3-moe ;;
    esac
}
with_round() {  # copies stdin to stdout, each JSON line given "round": $1 (the table pairs a round's runs)
  python -u -c '
import json, sys
for line in sys.stdin:
    if line.startswith("{"):
        try:
            line = json.dumps({**json.loads(line), "round": int(sys.argv[1])}) + "\n"
        except ValueError:
            pass
    sys.stdout.write(line)
' "$1"
}
gpu_rows() {  # $1 = this GPU's index, $2 = how many GPUs: every $2-th row from the $1-th
  local index=0
  declare -A runs=()  # a row named again is run again: its round counts how many times it ran before
  for row in $rows; do
    local round=${runs[$row]:-0}
    runs[$row]=$((round + 1))
    if [ $((index % $2)) -eq "$1" ]; then
      litft_row "$row" 2>>"$out/litft.err" | with_round "$round" | tee -a "$results"
      peer_row "$row" 2>>"$out/peers.err" | with_round "$round" | tee -a "$results"
    fi
    index=$((index + 1))
  done
}
gpus=$((gpus > 0 ? gpus : 1))
for ((gpu = 0; gpu < gpus; gpu++)); do
  (CUDA_VISIBLE_DEVICES=$gpu gpu_rows $gpu $gpus) &
done
wait
python benchmarks/table.py "$results" | tee "$out/table.md"
