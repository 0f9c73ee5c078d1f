#!/usr/bin/env bash
# Runs litft's benchmark and the peers' in ONE GPU command, so the ratios compare one machine at one time.
# Needs: .site (../shared/gpu/make-site.sh) and .bench/peers.py (a copy of ../shared/bench/peers.py) carried along.
#   bash benchmarks/run_gpu.sh [ROWS]        ROWS: a space-separated subset of: lora1b lora8b ckpt8b qlora8b decode8b dpo1b
#   (dpo1b has no peer: peers.py has no preference task)
# Writes $OUT/results.jsonl and $OUT/table.md (or ./benchmarks/out/ without $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
rows=${1:-"lora1b lora8b ckpt8b qlora8b decode8b"}
peers=${PEERS:-unsloth,hf,litgpt}
results="$out/results.jsonl"
run() {  # run NAME ARGS...: litft first, then the peers, same arguments
  echo "== $*" >&2
  python benchmarks/bench.py "$@" --compile | tee -a "$results"
  python .bench/peers.py --peers "$peers" "$@" | tee -a "$results"
}
for row in $rows; do
  case $row in
    lora1b)   run --task lora --shape llama-1b --batch 8 --seq 2048 ;;
    lora8b)   run --task lora --shape llama-8b --batch 4 --seq 2048 ;;
    ckpt8b)   run --task lora --shape llama-8b --batch 8 --seq 2048 --ckpt ;;
    qlora8b)  run --task qlora --shape llama-8b --batch 4 --seq 2048 ;;
    decode8b) run --task decode --shape llama-8b --prompt 128 --new 256 ;;
    dpo1b)    python benchmarks/bench.py --task dpo --shape llama-1b --batch 4 --seq 1024 --compile | tee -a "$results" ;;
  esac
done
python benchmarks/table.py "$results" | tee "$out/table.md"
