"""Turns the JSON lines of `bench.py` and `peers.py` (one GPU command) into the ratio table of the README.

  python benchmarks/table.py results.jsonl > table.md

A row that the command ran several times (`run_gpu.sh "lora8b lora8b lora8b"`: `run_gpu.sh` tags each run's lines
with its `round`) gives one line per round, each litft run compared with the peers' run right after it on the same
GPU, then a line with every round's speed ratio and their median: a ratio near a target is a claim about the spread
between runs as much as about the mean.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

PEERS = ("unsloth", "hf", "litgpt")


def row_key(record: dict) -> tuple:
    if record["task"] == "longest-sequence":
        return ("longest sequence (predicted)", record["shape"], "1 x ?", True)
    if record["task"] == "decode":
        return ("decode", record["shape"], f"{record.get('prompt', 128)} + {record.get('new', 256)}", False)
    task = record["task"]
    if record.get("quantize") == "fp8":  # litft's float8 base, set beside the peers' bf16 LoRA row
        task = "lora, fp8 base"
    return (task, record["shape"], f"{record.get('batch')} x {record.get('seq')}", bool(record.get("ckpt")))


def read_records(lines) -> dict[tuple, dict[int, dict[str, dict]]]:
    """{row: {round: {peer: record}}} from JSON lines (other lines skipped). litft may run in several variants
    within a round (--compile or not): the fastest is kept."""
    rows: dict[tuple, dict[int, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if "predicted_longest" in record:  # the longest-sequence probe: its "speed" is the length it fits
            record = {**record, "tokens_per_s": record["predicted_longest"], "peak_mem_gib": 0}
        peers = rows[row_key(record)][record.get("round", 0)]
        earlier = peers.get(record["peer"])
        if earlier is None or "error" in earlier or record.get("tokens_per_s", 0) > earlier.get("tokens_per_s", 0):
            peers[record["peer"]] = record
    return rows


def peer_records(peers: dict[str, dict]) -> list[dict]:
    """The peers' records that measured a speed (not litft's, not errors)."""
    return [record for name, record in peers.items() if name != "litft" and "tokens_per_s" in record]


def speed_ratio(peers: dict[str, dict]) -> tuple[float, str] | None:
    """litft's tokens/s over the fastest peer's, and that peer; None without both."""
    others = peer_records(peers)
    ours = peers.get("litft")
    if not ours or "tokens_per_s" not in ours or not others:
        return None
    best = max(others, key=lambda record: record["tokens_per_s"])
    return ours["tokens_per_s"] / best["tokens_per_s"], best["peer"]


def table_lines(rows: dict[tuple, dict[int, dict[str, dict]]]) -> list[str]:
    lines = [
        "| task | shape | batch x seq | litft tok/s, GiB | Unsloth | HF+PEFT | LitGPT | litft / best peer (speed) "
        "| litft / leanest peer (memory) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, shape, size, ckpt), rounds in rows.items():
        label = task + (" + act. ckpt" if ckpt and task in ("lora", "qlora") else "")
        ratios = []
        for round_, peers in sorted(rounds.items()):
            if task == "lora, fp8 base":  # compared with the peers' LoRA (bf16 base) at the same shape and round
                bf16 = rows.get(("lora", shape, size, ckpt), {}).get(round_, {})
                peers = {**{name: record for name, record in bf16.items() if name != "litft"}, **peers}

            def cell(name):
                record = peers.get(name)
                if record is None:
                    return "-"
                if "error" in record:
                    return f"error: {record['error'][:60]}"
                variant = " (compiled)" if record.get("compile") else ""
                return f"{record['tokens_per_s']:,}, {record.get('peak_mem_gib', '?')}{variant}"

            speed = memory = "-"
            ratio = speed_ratio(peers)
            if ratio is not None:
                ratios.append(ratio[0])
                speed = f"{ratio[0]:.2f}x ({ratio[1]})"
                leanest = min(peer_records(peers), key=lambda record: record["peak_mem_gib"])
                if leanest["peak_mem_gib"]:
                    memory = f"{peers['litft']['peak_mem_gib'] / leanest['peak_mem_gib']:.2f}x ({leanest['peer']})"
            which = f" (run {round_ + 1} of {len(rounds)})" if len(rounds) > 1 else ""
            lines.append(f"| {label}{which} | {shape} | {size} | {cell('litft')} | "
                         f"{' | '.join(cell(name) for name in PEERS)} | {speed} | {memory} |")
        if len(ratios) > 1:
            each = ", ".join(f"{ratio:.3f}" for ratio in ratios)
            lines.append(f"| {label}, {len(ratios)} runs | {shape} | {size} | | | | | each run {each}; median "
                         f"{statistics.median(ratios):.3f}x, lowest {min(ratios):.3f}x | |")
    return lines


def main(path: str) -> None:
    with open(path) as lines:
        print("\n".join(table_lines(read_records(lines))))


if __name__ == "__main__":
    main(sys.argv[1])
