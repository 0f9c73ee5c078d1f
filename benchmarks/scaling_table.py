"""Turns `bench_distributed.py` JSON lines into the scaling table of the README: per case, tokens/s in all and per
GPU, peak memory per GPU, and the scaling efficiency (tokens/s at N GPUs over N x tokens/s at one GPU of the same
case; one GPU must be among the lines).

  python benchmarks/scaling_table.py scaling.jsonl > scaling.md
"""

from __future__ import annotations

import json
import sys


def case_of(record: dict) -> tuple:
    return (record["strategy"], record["task"], record["shape"], record["batch_per_gpu"], record["seq"],
            bool(record.get("ckpt")), record.get("ckpt_blocks"), bool(record.get("offload")))


def main(path: str) -> None:
    runs: dict[tuple, dict[int, dict]] = {}
    with open(path) as lines:
        records = [json.loads(line) for line in lines if line.startswith("{")]
    for record in records:
        if "devices" in record and "tokens_per_s" in record:
            runs.setdefault(case_of(record), {})[record["devices"]] = record
    print("| case | GPUs | tokens/s in all | per GPU | peak GiB per GPU | efficiency |")
    print("|---|---|---|---|---|---|")
    for case, by_count in runs.items():
        strategy, task, shape, batch, seq, ckpt, blocks, offload = case
        label = f"{'FSDP2' if strategy == 'fsdp' else 'DDP'} {task}, {shape}, {batch} x {seq} per GPU"
        if ckpt:
            label += ", offloaded ckpt" if offload else ", act. ckpt"
            label += f" ({blocks} blocks)" if blocks is not None else ""
        one = by_count.get(1)
        for count in sorted(by_count):
            record = by_count[count]
            efficiency = f"{record['tokens_per_s'] / (count * one['tokens_per_s']):.2f}" if one else "-"
            print(f"| {label} | {count} | {record['tokens_per_s']:,} | {record['tokens_per_s_per_gpu']:,} | "
                  f"{record['peak_mem_gib_per_gpu']} | {efficiency} |")


if __name__ == "__main__":
    main(sys.argv[1])
