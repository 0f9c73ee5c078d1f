"""Kernel-level measurements behind the speed decisions (GPU only), one JSON line per measurement:

  attention   scaled_dot_product_attention forward + backward (causal, grouped-query) per backend: flash, cuDNN,
              memory-efficient, on llama-1b and llama-8b geometry;
  gemm        the frozen projections' two GEMMs of a LoRA step (forward x @ W^T, input gradient dy @ W) in bf16,
              the forward accumulating into an existing output in place (beta = 1) and followed by a separate add,
              and the same in 8-bit float (torch._scaled_mm, row-wise scales), with the cost of quantizing the
              activations to 8-bit float counted separately;
  lora        one adapted projection (litft's LoRALinear, compiled) forward + backward against its frozen base alone:
              what the rank-16 branch costs on top of the base GEMMs.

  python benchmarks/bench_kernels.py [--only attention,gemm,lora] [--tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fused_projections import time_ms

from litft.adapters.float8 import quantize_rows  # the activation scaling litft's float8 base runs

PROJECTIONS = {  # (in, out) of each frozen projection
    "llama-8b": {"q": (4096, 4096), "kv": (4096, 1024), "o": (4096, 4096), "gate_up": (4096, 14336),
                 "down": (14336, 4096), "lm_head": (4096, 128256)},
    "llama-1b": {"q": (2048, 2048), "kv": (2048, 512), "o": (2048, 2048), "gate_up": (2048, 8192),
                 "down": (8192, 2048), "lm_head": (2048, 128256)},
}
ATTENTION = {  # rows, heads, kv heads, head dim at 2048 tokens per row
    "llama-8b": (4, 32, 8, 128),
    "llama-1b": (8, 32, 8, 64),
}


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def bench_attention(seq: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for shape, (rows, heads, kv_heads, head_dim) in ATTENTION.items():
        q = torch.randn(rows, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(rows, kv_heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        grad = torch.randn(rows, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
        # causal: half of the 4 * T^2 * d score and value FLOPs per head, backward 2.5x the forward
        flops = 3.5 * 2 * rows * heads * seq * seq * head_dim
        for name, backend in backends.items():
            for expand in (False, True):
                def step():
                    key, value = k, v
                    if expand:  # the grouped heads repeated, for kernels without native grouped-query support
                        key = k.repeat_interleave(heads // kv_heads, dim=1)
                        value = v.repeat_interleave(heads // kv_heads, dim=1)
                    with sdpa_kernel(backend):
                        out = F.scaled_dot_product_attention(q, key, value, is_causal=True, enable_gqa=not expand)
                    out.backward(grad)

                try:
                    elapsed = time_ms(step)
                except RuntimeError as error:
                    emit(kind="attention", shape=shape, backend=name, expand_kv=expand, error=str(error)[:120])
                    continue
                emit(kind="attention", shape=shape, backend=name, expand_kv=expand, ms=round(elapsed, 3),
                     tflops=round(flops / elapsed / 1e9, 1))


def bench_gemm(tokens: int) -> None:
    quantize = torch.compile(quantize_rows)
    for shape, projections in PROJECTIONS.items():
        for name, (n_in, n_out) in projections.items():
            x = torch.randn(tokens, n_in, device="cuda", dtype=torch.bfloat16)
            weight = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) / n_in**0.5
            grad = torch.randn(tokens, n_out, device="cuda", dtype=torch.bfloat16)
            addend = torch.randn(tokens, n_out, device="cuda", dtype=torch.bfloat16)  # e.g. the LoRA branch's output
            flops = 2 * tokens * n_in * n_out
            x8, x_scale = quantize(x)
            g8, g_scale = quantize(grad)
            w8, w_scale = quantize(weight)  # per output row: forward
            wt8, wt_scale = quantize(weight.t().contiguous())  # per input column: input gradient
            w_scale, wt_scale = w_scale.reshape(1, -1), wt_scale.reshape(1, -1)
            cases = {
                "bf16_forward": lambda: x @ weight.t(),
                "bf16_input_grad": lambda: grad @ weight,
                # litft.adapters.lora_projections adds the LoRA output inside the base GEMM (cuBLAS beta = 1):
                "bf16_forward_accumulate_in_place": lambda: addend.addmm_(x, weight.t()),
                "bf16_forward_then_add": lambda: (x @ weight.t()).add_(addend),
                "fp8_forward": lambda: torch._scaled_mm(x8, w8.t(), x_scale, w_scale, out_dtype=torch.bfloat16),
                "fp8_input_grad": lambda: torch._scaled_mm(g8, wt8.t(), g_scale, wt_scale,
                                                           out_dtype=torch.bfloat16),
                "fp8_forward_fast_accum": lambda: torch._scaled_mm(x8, w8.t(), x_scale, w_scale,
                                                                   out_dtype=torch.bfloat16, use_fast_accum=True),
                "quantize_activations": lambda: quantize(x),
                "quantize_grad": lambda: quantize(grad),
            }
            for case, function in cases.items():
                try:
                    elapsed = time_ms(function)
                except RuntimeError as error:
                    emit(kind="gemm", shape=shape, projection=name, case=case, error=str(error)[:160])
                    continue
                record = dict(kind="gemm", shape=shape, projection=name, tokens=tokens, case=case,
                              ms=round(elapsed, 4))
                if "quantize" not in case:
                    record["tflops"] = round(flops / elapsed / 1e9, 1)
                emit(**record)
            # how far the 8-bit forward is from bf16 (relative Frobenius error of the output)
            reference = (x.float() @ weight.float().t())
            fp8 = torch._scaled_mm(x8, w8.t(), x_scale, w_scale, out_dtype=torch.bfloat16).float()
            emit(kind="gemm_error", shape=shape, projection=name,
                 fp8_relative_error=round(((fp8 - reference).norm() / reference.norm()).item(), 5),
                 bf16_relative_error=round((((x @ weight.t()).float() - reference).norm() / reference.norm()).item(), 5))


def bench_lora(tokens: int) -> None:
    from litft.adapters.lora import LoRAConfig, LoRALinear

    config = LoRAConfig(rank=16, alpha=32, targets=["q"])
    for shape, projections in PROJECTIONS.items():
        for name, (n_in, n_out) in projections.items():
            if name == "lm_head":
                continue
            base = torch.nn.Linear(n_in, n_out, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
            adapted = LoRALinear(base, config)
            x = torch.randn(tokens, n_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            grad = torch.randn(tokens, n_out, device="cuda", dtype=torch.bfloat16)
            for case, module in (("frozen_base", base), ("lora", adapted)):
                compiled = torch.compile(module)

                def step():
                    compiled(x).backward(grad)

                emit(kind="lora", shape=shape, projection=name, tokens=tokens, case=case,
                     ms=round(time_ms(step), 4))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="attention,gemm,lora")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per GEMM (rows x sequence length)")
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a GPU")
    emit(kind="device", name=torch.cuda.get_device_name(), torch=torch.__version__)
    chosen = args.only.split(",")
    if "attention" in chosen:
        bench_attention(args.seq)
    if "gemm" in chosen:
        bench_gemm(args.tokens)
    if "lora" in chosen:
        bench_lora(args.tokens)


if __name__ == "__main__":
    main()
