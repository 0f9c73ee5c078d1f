#!/usr/bin/env bash
# Sets the machine up (scripts/setup.sh), then fine-tunes the bundled pretrained tiny Llama with LoRA on a
# bundled chat dataset, offline, on the CPU, and shows the fine-tuned model's answer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
out=out/quickstart
litft finetune lora --config recipes/quickstart/lora.yaml --out_dir "$out" --overwrite true
litft generate --checkpoint "$out/final" --chat true \
  --prompt "What is your name?" --max_new_tokens 60 --temperature 0
