"""Pinned host <-> GPU copy rates, one direction at a time, both at once, and beside a stream of GEMMs (GPU only).

What offloaded activation checkpointing can move while a forward computes (benchmarks/NOTES.md, section 13): on
an H200 host 55.3 GB/s to the host, 55.4 back, 50.7 each way at once, and 40 llama-8b-sized GEMMs took 56.7 ms
alone and 56.9 with both copies running beside them. (Those numbers came from this script's first version, the
same copies and GEMMs written as a scratch file; this version has not yet run on a GPU.)

  python benchmarks/bench_pcie.py [--gib 1.5]
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(step, repeats: int = 3) -> float:
    """Seconds per call of `step`, after one warm-up call."""
    step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.5, help="size of each copy")
    args = parser.parse_args()
    device = torch.device("cuda")
    elements = int(args.gib * 2**30) // 2  # bf16
    on_device = torch.empty(elements, dtype=torch.bfloat16, device=device)
    on_device_too = torch.empty(elements, dtype=torch.bfloat16, device=device)
    on_host = torch.empty(elements, dtype=torch.bfloat16, pin_memory=True)
    on_host_too = torch.empty(elements, dtype=torch.bfloat16, pin_memory=True)
    down, up, compute = torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.Stream()
    activations = torch.randn(8192, 4096, device=device, dtype=torch.bfloat16)
    weight = torch.randn(14336, 4096, device=device, dtype=torch.bfloat16)
    gigabytes = elements * 2 / 1e9

    def both_directions():
        with torch.cuda.stream(down):
            on_host.copy_(on_device, non_blocking=True)
        with torch.cuda.stream(up):
            on_device_too.copy_(on_host_too, non_blocking=True)
        for stream in (down, up):
            torch.cuda.current_stream().wait_stream(stream)

    def gemms(count: int = 40):
        for _ in range(count):
            activations @ weight.t()

    def gemms_beside_copies():
        with torch.cuda.stream(compute):
            gemms()
        both_directions()
        torch.cuda.current_stream().wait_stream(compute)

    print(f"to the host {gigabytes / timed(lambda: on_host.copy_(on_device, non_blocking=True)):.1f} GB/s")
    print(f"to the GPU {gigabytes / timed(lambda: on_device.copy_(on_host, non_blocking=True)):.1f} GB/s")
    print(f"both directions at once: {gigabytes / timed(both_directions):.1f} GB/s each")
    print(f"40 GEMMs alone {timed(gemms) * 1e3:.1f} ms, beside both copies {timed(gemms_beside_copies) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
