#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment in .venv with the CPU build of torch (unless a
# GPU build is wanted: LITFT_TORCH=cuda) and litft installed in editable mode with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
py=.venv/bin/python
stamp=.venv/.litft-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  $py -m pip install -q --upgrade pip >/dev/null
  if ! $py -c "import torch" 2>/dev/null; then
    if [[ "${LITFT_TORCH:-cpu}" == "cpu" ]]; then
      # The CPU wheel; the constraint pip has on this machine keeps torch at or below 2.14.1.
      $py -m pip install -q "torch==2.13.0" || $py -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    else
      $py -m pip install -q torch
    fi
  fi
  $py -m pip install -q -e ".[test]"
  touch $stamp
fi
