"""Turns the JSON lines of `bench.py` and `peers.py` (one GPU command) into the ratio table of the README.

  python benchmarks/table.py results.jsonl > table.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def row_key(record: dict) -> tuple:
    if record["task"] == "longest-sequence":
        return ("longest sequence (predicted)", record["shape"], "1 x ?", True)
    if record["task"] == "decode":
        return ("decode", record["shape"], f"{record.get('prompt', 128)} + {record.get('new', 256)}", False)
    task = record["task"]
    if record.get("quantize") == "fp8":  # litft's float8 base, set beside the peers' bf16 LoRA row
        task = "lora, fp8 base"
    return (task, record["shape"], f"{record.get('batch')} x {record.get('seq')}", bool(record.get("ckpt")))


def main(path: str) -> None:
    rows: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            record = json.loads(line)
            peers = rows[row_key(record)]
            earlier = peers.get(record["peer"])
            # litft may run in several variants (--compile or not): the table keeps the fastest and says which.
            if "predicted_longest" in record:  # the longest-sequence probe: its "speed" is the length it fits
                record = {**record, "tokens_per_s": record["predicted_longest"], "peak_mem_gib": 0}
            if earlier is None or "error" in earlier or record.get("tokens_per_s", 0) > earlier.get("tokens_per_s", 0):
                peers[record["peer"]] = record
    print("| task | shape | batch x seq | litft tok/s, GiB | Unsloth | HF+PEFT | LitGPT | litft / best peer (speed) | litft / leanest peer (memory) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (task, shape, size, ckpt), peers in rows.items():
        if task == "lora, fp8 base":  # compared with the peers' LoRA (bf16 base) at the same shape
            peers = {**{n: r for n, r in rows.get(("lora", shape, size, ckpt), {}).items() if n != "litft"}, **peers}
        def cell(name):
            record = peers.get(name)
            if record is None:
                return "-"
            if "error" in record:
                return f"error: {record['error'][:60]}"
            variant = " (compiled)" if record.get("compile") else ""
            return f"{record['tokens_per_s']:,}, {record.get('peak_mem_gib', '?')}{variant}"

        others = [r for n, r in peers.items() if n != "litft" and "tokens_per_s" in r]
        ours = peers.get("litft")
        speed = memory = "-"
        if ours and "tokens_per_s" in ours and others:
            best = max(others, key=lambda r: r["tokens_per_s"])
            leanest = min(others, key=lambda r: r["peak_mem_gib"])
            speed = f"{ours['tokens_per_s'] / best['tokens_per_s']:.2f}x ({best['peer']})"
            if leanest["peak_mem_gib"]:
                memory = f"{ours['peak_mem_gib'] / leanest['peak_mem_gib']:.2f}x ({leanest['peer']})"
        label = task + (" + act. ckpt" if ckpt and task in ("lora", "qlora") else "")
        print(f"| {label} | {shape} | {size} | {cell('litft')} | {cell('unsloth')} | {cell('hf')} | {cell('litgpt')} | {speed} | {memory} |")


if __name__ == "__main__":
    main(sys.argv[1])
