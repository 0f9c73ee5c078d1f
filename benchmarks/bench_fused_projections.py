"""Would fusing the q/k/v and gate/up projections pay? Times the frozen-base LoRA projections of one decoder block
on their own, separate (as litft runs them: one GEMM per Hugging Face weight) and fused (one GEMM over the
concatenated weights, the LoRA A matrices batched into one GEMM as well), forward plus the input gradient (the
frozen base needs no weight gradient).

  python benchmarks/bench_fused_projections.py --shape llama-8b --tokens 8192

Prints one JSON line per group (qkv, gate_up) with milliseconds per forward+backward for each layout and the share
of a whole training step the difference would be (from the step time given by --step_ms, e.g. measured by bench.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import SHAPES

RANK = 16


def lora_projection(x, weights, lora_a, lora_b, scaling):
    """Separate layout: one base GEMM and one LoRA pair per weight."""
    return [x @ w.t() + (x @ a.t()) @ b.t() * scaling for w, a, b in zip(weights, lora_a, lora_b)]


def fused_projection(x, fused_weight, fused_a, lora_b, sizes, scaling):
    """Fused layout: one base GEMM over the concatenated weights, one GEMM for every A at once."""
    base = (x @ fused_weight.t()).split(sizes, dim=-1)
    down = (x @ fused_a.t()).split([RANK] * len(sizes), dim=-1)
    return [y + (d @ b.t()) * scaling for y, d, b in zip(base, down, lora_b)]


def time_ms(function, repeats: int = 20, queued: bool = False) -> float:
    """GPU milliseconds per call. `queued`: the calls are queued behind a ~10 ms spin of the GPU's own before the
    clock starts, so a call whose host side (Python, launches) outlasts its kernels is timed by its kernels, as in
    a training step, where the host runs ahead of the GPU; otherwise back-to-back calls from an idle GPU."""
    for _ in range(3):
        function()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if queued:
        torch.cuda._sleep(20_000_000)  # cycles: ~10 ms at the H200's clock, time for the host to queue the calls
    start.record()
    for _ in range(repeats):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=["llama-1b", "llama-8b"], default="llama-8b")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--step_ms", type=float, default=None, help="a whole step's time, to report the share")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    hidden, head_dim = shape["hidden"], shape["hidden"] // shape["heads"]
    groups = {
        "qkv": [hidden, shape["kv"] * head_dim, shape["kv"] * head_dim],
        "gate_up": [shape["inter"], shape["inter"]],
    }
    for name, sizes in groups.items():
        separate_ms, fused_ms = measure_group(sizes, hidden, args.tokens)
        saved_ms = (separate_ms - fused_ms) * shape["layers"]
        row = {
            "group": name, "shape": args.shape, "tokens": args.tokens, "separate_ms": round(separate_ms, 3),
            "fused_ms": round(fused_ms, 3), "speedup": round(separate_ms / fused_ms, 3),
            "saved_ms_per_step": round(saved_ms, 2),
        }
        if args.step_ms:
            row["share_of_step"] = round(saved_ms / args.step_ms, 4)
        print(json.dumps(row), flush=True)


def measure_group(sizes: list[int], hidden: int, tokens: int) -> tuple[float, float]:
    """Milliseconds per forward + input gradient of one group of projections: separate, then fused."""
    device, dtype = "cuda", torch.bfloat16
    weights = [torch.randn(size, hidden, device=device, dtype=dtype) * 0.02 for size in sizes]
    fused_weight = torch.cat(weights)
    lora_a = [(torch.randn(RANK, hidden, device=device, dtype=dtype) * 0.02).requires_grad_() for _ in sizes]
    lora_b = [(torch.randn(size, RANK, device=device, dtype=dtype) * 0.02).requires_grad_() for size in sizes]
    fused_a = torch.cat([a.detach() for a in lora_a]).requires_grad_()
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    grads = [torch.randn(tokens, size, device=device, dtype=dtype) for size in sizes]

    def separate():
        torch.autograd.backward(lora_projection(x, weights, lora_a, lora_b, 2.0), grads)

    def fused():
        torch.autograd.backward(fused_projection(x, fused_weight, fused_a, lora_b, sizes, 2.0), grads)

    with torch.no_grad():  # both layouts compute the same projections
        for a, b in zip(lora_projection(x, weights, lora_a, lora_b, 2.0),
                        fused_projection(x, fused_weight, fused_a, lora_b, sizes, 2.0)):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    return time_ms(separate), time_ms(fused)


if __name__ == "__main__":
    main()
