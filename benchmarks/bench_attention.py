"""Causal attention alone, forward and backward, at the benchmark rows' shapes: SDPA as PyTorch picks its kernel
(cuDNN on an H200), SDPA's built-in flash kernel, and FlashAttention-4 (litft.models.flash_attention). The Gemma
shapes have a sliding window (and Gemma 2 soft-capping): there "sdpa" is what litft runs without FlashAttention-4,
SDPA under a dense window mask (explicit capped scores for Gemma 2), and FlashAttention-4 gets the window and the
cap as numbers; SDPA's flash kernel takes neither, so it is left out.

q, k, v are laid out as litft's blocks hand them over: (B, T, heads, head_dim) memory seen as (B, heads, T,
head_dim). Each variant is first checked against float32 attention on one row (output and the three gradients,
largest error relative to the largest reference value), then timed: `forward_ms` (forward alone) and `step_ms`
(forward and backward), each the median of `--rounds` rounds of `--calls` back-to-back calls, variants alternating
round by round; `mj_per_step` the GPU's energy per forward and backward (NVML), over ~1 s of calls per round.

  python benchmarks/bench_attention.py [--shapes llama-8b llama-1b] [--rounds 5 --calls 20]

Prints one JSON line per shape and variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import energy_counter_mj

from litft.models import common, flash_attention

# The rows in the README's table, and Gemma 2 2B's and Gemma 3 1B's attention (a sliding layer each) on long rows.
SHAPES = {
    "llama-8b": dict(batch=4, seq=2048, heads=32, kv_heads=8, head_dim=128),
    "llama-1b": dict(batch=8, seq=2048, heads=32, kv_heads=8, head_dim=64),
    "gemma2-2b": dict(batch=1, seq=8192, heads=8, kv_heads=4, head_dim=256, window=4096, softcap=50.0),
    "gemma3-1b": dict(batch=2, seq=8192, heads=4, kv_heads=1, head_dim=256, window=512),
}
VARIANTS = ("sdpa", "sdpa_flash", "flash4")


def windowed(shape: dict) -> bool:
    return shape.get("window") is not None or shape.get("softcap") is not None


def window_mask(shape: dict) -> torch.Tensor | None:
    """The (T, T) mask of a sliding window (None: plain causal), as litft builds it without FlashAttention-4."""
    if not windowed(shape):
        return None
    index = torch.arange(shape["seq"], device="cuda")
    mask = index[None, :] <= index[:, None]
    if shape.get("window") is not None:
        mask &= index[None, :] > index[:, None] - shape["window"]
    return mask


def attend(variant: str, shape: dict, mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
           v: torch.Tensor) -> torch.Tensor:
    if variant == "flash4":
        return flash_attention.causal_attention(q, k, v, None, shape.get("window"), shape.get("softcap"))
    if windowed(shape):  # litft's path without FlashAttention-4 (a mask keeps `attention` off it)
        return common.attention(q, k, v, mask, False, softcap=shape.get("softcap"))
    if variant == "sdpa_flash":
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def scores_computed(shape: dict) -> int:
    """Scores a causal (and windowed) pass needs per row and head: query i sees min(i + 1, window) keys."""
    seq, window = shape["seq"], shape.get("window") or shape["seq"]
    return sum(min(i + 1, window) for i in range(seq))


def inputs(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    tensors = []
    for count in (heads, kv_heads, kv_heads):
        t = torch.randn(batch, seq, count, head_dim, device="cuda", dtype=torch.bfloat16, generator=generator)
        tensors.append(t.transpose(1, 2).requires_grad_())  # (B, heads, T, hd) view of (B, T, heads, hd)
    return tensors


def errors(variant: str, shape: dict) -> dict[str, float]:
    """Largest error of the output and of each gradient, relative to the largest float32 reference value."""
    seq, heads, kv_heads, head_dim = shape["seq"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    q, k, v = inputs(1, seq, heads, kv_heads, head_dim, seed=1)
    grad = torch.randn(1, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    mask = window_mask(shape)
    out = attend(variant, shape, mask, q, k, v)
    out.backward(grad)
    got = [out.float(), q.grad.float(), k.grad.float(), v.grad.float()]
    reference_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    group = heads // kv_heads
    rq, rk, rv = reference_inputs
    rk, rv = rk.repeat_interleave(group, 1), rv.repeat_interleave(group, 1)
    causal = torch.ones(seq, seq, dtype=torch.bool, device="cuda").tril()
    with sdpa_kernel([SDPBackend.MATH]):
        reference = common.attention(rq, rk, rv, causal if mask is None else mask, False,
                                     softcap=shape.get("softcap"))
    reference.backward(grad.float())
    expected = [reference, rq.grad, rk.grad, rv.grad]
    return {name: ((a - b).abs().max() / b.abs().max()).item()
            for name, a, b in zip(("out", "grad_q", "grad_k", "grad_v"), got, expected)}


def timed(variant: str, shape: dict, mask: torch.Tensor | None, tensors: list[torch.Tensor], calls: int,
          backward: bool) -> float:
    """Milliseconds per call over `calls` back-to-back calls."""
    q, k, v = tensors
    grad = torch.ones_like(q)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(calls):
        if backward:
            attend(variant, shape, mask, q, k, v).backward(grad)
        else:
            with torch.no_grad():
                attend(variant, shape, mask, q, k, v)
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    flash_attention.FLASH_ATTENTION_4 = "always"  # fail loudly rather than time SDPA under flash4's name
    for name in args.shapes:
        shape = SHAPES[name]
        batch, seq, heads, kv_heads, head_dim = (shape[key] for key in ("batch", "seq", "heads", "kv_heads",
                                                                        "head_dim"))
        tensors = inputs(batch, seq, heads, kv_heads, head_dim, seed=0)
        mask = window_mask(shape)
        variants = [variant for variant in args.variants if not (windowed(shape) and variant == "sdpa_flash")]
        results = {variant: dict(errors=errors(variant, shape), forward=[], step=[], mj=[]) for variant in variants}
        for variant in variants:  # warm up: kernels compiled, the clock up
            timed(variant, shape, mask, tensors, 3, backward=True)
        for _ in range(args.rounds):
            for variant in variants:
                results[variant]["forward"].append(timed(variant, shape, mask, tensors, args.calls, backward=False))
                results[variant]["step"].append(timed(variant, shape, mask, tensors, args.calls, backward=True))
                # NVML's counter moves in steps of tens of milliseconds: count energy over ~1 s of calls.
                energy_calls = max(args.calls, int(1000 / results[variant]["step"][-1]))
                energy_before = energy_counter_mj()
                timed(variant, shape, mask, tensors, energy_calls, backward=True)
                energy_after = energy_counter_mj()
                if energy_before is not None:
                    results[variant]["mj"].append((energy_after - energy_before) / energy_calls)
        # The scores within the window (causal: about half). Forward 2 GEMMs, backward 5 (dV, dP, dQ, dK and the
        # recomputed scores).
        flops = 4 * batch * heads * scores_computed(shape) * head_dim
        for variant, result in results.items():
            forward_ms, step_ms = statistics.median(result["forward"]), statistics.median(result["step"])
            print(json.dumps(dict(
                shape=name, variant=variant, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                window=shape.get("window"), softcap=shape.get("softcap"),
                forward_ms=round(forward_ms, 4), step_ms=round(step_ms, 4),
                forward_tflops=round(flops / forward_ms / 1e9, 1),
                step_tflops=round(3.5 * flops / step_ms / 1e9, 1),
                mj_per_step=round(statistics.median(result["mj"]), 1) if result["mj"] else None,
                errors={key: float(f"{value:.3g}") for key, value in result["errors"].items()},
                gpu=torch.cuda.get_device_name(),
            )), flush=True)


if __name__ == "__main__":
    main()
