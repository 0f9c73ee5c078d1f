"""Kernel-level measurements behind the speed decisions (GPU only), one JSON line per measurement:

  attention   scaled_dot_product_attention forward + backward (causal, grouped-query) per backend: flash, cuDNN,
              memory-efficient, on llama-1b and llama-8b geometry;
  gemm        the frozen projections' two GEMMs of a LoRA step (forward x @ W^T, input gradient dy @ W) in bf16,
              the forward accumulating into an existing output in place (beta = 1) and followed by a separate add,
              and the same in 8-bit float (torch._scaled_mm, row-wise scales), with the cost of quantizing the
              activations to 8-bit float counted separately;
  lora        one adapted projection (litft's LoRALinear, compiled) forward + backward against its frozen base alone:
              what the rank-16 branch costs on top of the base GEMMs;
  qkv         q/k/v's (and gate/up's) base GEMMs as litft's grouped LoRA operator runs them (the A factors batched,
              the forward adding into the adapters' output, the input gradient accumulated), one GEMM per layer
              against one over the concatenated weights;
  nf4         dequantizing a double-quantized NF4 weight: bitsandbytes' kernels against litft's Triton kernel at
              several program sizes (timed per call, launch included);
  gemm_backends
              the frozen projections' bf16 GEMMs (forward, forward adding into an existing output, input gradient)
              through cuBLAS (torch's default), cuBLASLt (torch.backends.cuda.preferred_blas_library) and the
              best of inductor's autotuned Triton templates (max-autotune, persistent TMA kernels allowed): whether
              a library other than the default runs the base GEMMs of a LoRA step faster.

  lora_gemm   a projection's base GEMM and its adapter's update as litft's grouped operator computes them: through
              cuBLAS (the update, then the base GEMM adding into it in place; the input gradient likewise) against
              litft.adapters.lora_gemm's one Triton kernel, each configuration, and what `auto` picks.

  cross_entropy
              the loss of one chunk of logits (2,093 rows of a 128k vocabulary in bf16, ~512 MiB: what litft.training.loss
              projects at a time) and its gradient: torch.compile of the tensor code against
              litft.training.cross_entropy_kernel at several block sizes, warps and programs per multiprocessor.

  adapter_gradients
              an adapted projection's two adapter gradients, grad @ B and grad^T @ low (rank 16, bf16), on llama-8b's
              widths (14,336, 4,096, 1,024) and on q's and k's column blocks of the joined q/k/v gradient (8,192 x
              6,144): the two torch matmuls (each reading grad) against litft.adapters.adapter_gradients' one kernel
              (reading it once) at several block sizes, warps, stages and programs per multiprocessor; GB/s counts
              one read of grad.
  rotary      q, k, v split into heads and rotated from the joined projection output, into causal attention and
              back, compiled: autograd's backward fused by inductor against litft.models.rotary_heads' kernel, and
              that kernel alone over a sweep of tokens per program and warps.
  gated_down  the down projection's gated activation (litft.adapters.lora_gated_down): what inductor ran before
              (act(gate) * up; in the backward h recomputed, g_low^T @ h, the activation's gradient) against the
              operator's kernels over a sweep of tiles.

  gated_projections
              a gated MLP's gate and up projections with their adapters and h = act(gate) * up: each projection
              through litft.adapters.lora_gemm's kernel (or cuBLAS) and then the elementwise product, against
              lora_gemm.gated_projections' one kernel; from idle, queued, sustained (~0.5 s of calls: the power
              limit), and the energy per call (NVML's counter over ~2 s of calls).
  lora_gemm_energy
              lora_gemm's kinds of call through cuBLAS and through the kernel: millijoules per call (NVML), two
              alternating rounds.
  depth       one GEMM's multiply-adds at reduction depths 2,048-28,672 (the output as wide as the depth allows),
              cuBLAS and lora_gemm's kernel: queued, sustained, millijoules per call (written in session 17 after
              its device time was spent: not yet run).
  extended_reduction
              a projection and its adapter as one cuBLAS GEMM whose reduction runs on over the rank-deep operands
              ([x | low] @ [W | B]^T, [dy | g_low] @ [W; sA]) against cuBLAS's pair, lora_gemm's kernel and the base
              GEMM alone: queued, sustained, millijoules per call (NOTES.md, section 25).
  pingpong    lora_gemm's kinds of call and the gated forward through cuBLAS, lora_gemm's Triton kernel and
              lora_gemm_pingpong's warp-specialized kernel (NOTES.md, section 28).
  python benchmarks/bench_kernels.py [--only attention,gemm,lora,qkv,nf4,gemm_backends,lora_gemm,cross_entropy,
                                             adapter_gradients,gated_down,rotary,gated_projections,lora_gemm_energy,
                                             depth,extended_reduction,pingpong]
                                     [--tokens 8192]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import energy_counter_mj
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


def bench_gemm_backends(tokens: int, shapes: list[str]) -> None:
    import torch._inductor.config as inductor_config

    inductor_config.max_autotune_gemm_backends = "TRITON"  # the default library is measured on its own below
    inductor_config.triton.enable_persistent_tma_matmul = True
    for shape in shapes:
        for name, (n_in, n_out) in PROJECTIONS[shape].items():
            x = torch.randn(tokens, n_in, device="cuda", dtype=torch.bfloat16)
            weight = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) / n_in**0.5
            grad = torch.randn(tokens, n_out, device="cuda", dtype=torch.bfloat16)
            addend = torch.randn(tokens, n_out, device="cuda", dtype=torch.bfloat16)
            flops = 2 * tokens * n_in * n_out
            cases = {
                "forward": (lambda: x @ weight.t(), lambda a, w: a @ w.t(), (x, weight)),
                "forward_accumulate": (lambda: addend.addmm_(x, weight.t()),
                                       lambda y, a, w: torch.addmm(y, a, w.t()), (addend, x, weight)),
                "input_grad": (lambda: grad @ weight, lambda g, w: g @ w, (grad, weight)),
            }
            for case, (eager, definition, inputs) in cases.items():
                timings = {}
                for library in ("cublas", "cublaslt"):
                    torch.backends.cuda.preferred_blas_library(library)
                    timings[library] = time_ms(eager)
                torch.backends.cuda.preferred_blas_library("cublas")
                try:
                    compiled = torch.compile(definition, mode="max-autotune-no-cudagraphs", dynamic=False)
                    timings["triton_autotuned"] = time_ms(lambda: compiled(*inputs))
                except Exception as error:  # noqa: BLE001 - an autotuning failure is a result here
                    emit(kind="gemm_backend", shape=shape, projection=name, case=case, backend="triton_autotuned",
                         error=str(error)[:160])
                for backend, elapsed in timings.items():
                    emit(kind="gemm_backend", shape=shape, projection=name, tokens=tokens, case=case,
                         backend=backend, ms=round(elapsed, 4), tflops=round(flops / elapsed / 1e9, 1))
                torch._dynamo.reset()


def lora_gemm_cases(tokens: int, shape: str, rank: int = 16) -> list[tuple[str, list, bool]]:
    """(name, pairs, transposed) of each kind of `lora_gemm.sum_of_products` call in a LoRA step: the forward of one
    projection, the input gradient of a group."""
    def randn(*size):
        return torch.randn(*size, device="cuda", dtype=torch.bfloat16)

    projections = PROJECTIONS[shape]
    hidden, kv = projections["q"][0], projections["kv"][1]
    inter = projections["gate_up"][1]
    return [
        ("forward_qkv_joined", [(randn(tokens, hidden), randn(hidden + 2 * kv, hidden)),
                                (randn(tokens, 3 * rank), randn(hidden + 2 * kv, 3 * rank))], True),
        ("forward_o", [(randn(tokens, hidden), randn(hidden, hidden)), (randn(tokens, rank), randn(hidden, rank))],
         True),
        ("forward_gate", [(randn(tokens, hidden), randn(inter, hidden)), (randn(tokens, rank), randn(inter, rank))],
         True),
        ("forward_down", [(randn(tokens, inter), randn(hidden, inter)), (randn(tokens, rank), randn(hidden, rank))],
         True),
        ("input_grad_qkv_joined", [(randn(tokens, hidden + 2 * kv), randn(hidden + 2 * kv, hidden)),
                                   (randn(tokens, 3 * rank), randn(3 * rank, hidden))], False),
        ("input_grad_o", [(randn(tokens, hidden), randn(hidden, hidden)),
                          (randn(tokens, rank), randn(rank, hidden))], False),
        ("input_grad_gate_up", [(randn(tokens, inter), randn(inter, hidden)),
                                (randn(tokens, inter), randn(inter, hidden)),
                                (randn(tokens, 2 * rank), randn(2 * rank, hidden))], False),
        ("input_grad_down", [(randn(tokens, hidden), randn(hidden, inter)),
                             (randn(tokens, rank), randn(rank, inter))], False),
    ]


def cublas_sum(pairs, transposed):
    """The grouped operator's cuBLAS path: the rank-deep product, then each base GEMM adding into it in place."""
    *base, (low, update) = pairs
    out = low @ (update.t() if transposed else update)
    for a, b in base:
        out.addmm_(a, b.t() if transposed else b)
    return out


def bench_lora_gemm_energy(tokens: int, shapes: list[str]) -> None:
    """Energy per call of each kind of call through cuBLAS and through the kernel, in alternating pairs (the GPU
    warms through the sequence), each over ~2 s of calls: at the power limit, where a step runs, energy is what
    sets time."""
    from litft.adapters import lora_gemm

    for shape in shapes:
        for name, pairs, transposed in lora_gemm_cases(tokens, shape):
            paths = {"cublas": lambda pairs=pairs, transposed=transposed: cublas_sum(pairs, transposed),
                     "triton": lambda pairs=pairs, transposed=transposed: lora_gemm._run(pairs, transposed, 0)}
            for round_ in range(2):
                for path, function in paths.items():
                    emit(kind="lora_gemm_energy", shape=shape, case=name, tokens=tokens, path=path, round=round_,
                         queued_ms=round(time_ms(function, queued=True), 4), mj_per_call=round(energy_mj(function), 2))


def bench_depth(tokens: int) -> None:
    """One GEMM's worth of work (8,192 x 14,336 x 4,096 multiply-adds at 8,192 tokens) at several reduction
    depths, the output as wide as the depth allows: cuBLAS's GEMM and lora_gemm's kernel (one pair, no adapter),
    queued, sustained (~0.5 s: the power limit) and millijoules per call. In the llama-8b step both run ~6% below
    their rate at 14,336 deep where the reduction is 4,096 deep (NOTES.md, section 20): whether that follows the
    depth (a tile's start and epilogue per 64 reduction steps) or the output's size is what this tells apart."""
    from litft.adapters import lora_gemm

    multiply_adds = tokens * 14336 * 4096
    for depth in (2048, 4096, 8192, 14336, 28672):
        columns = multiply_adds // (tokens * depth)
        x = torch.randn(tokens, depth, device="cuda", dtype=torch.bfloat16)
        weight = torch.randn(columns, depth, device="cuda", dtype=torch.bfloat16) / depth**0.5
        paths = {"cublas": lambda x=x, weight=weight: x @ weight.t(),
                 "triton": lambda x=x, weight=weight: lora_gemm._run([(x, weight)], True, 0)}
        sustained_calls = max(20, int(500 / time_ms(paths["cublas"], queued=True)))
        for round_ in range(2):
            for path, function in paths.items():
                sustained = time_ms(function, repeats=sustained_calls, queued=True)
                emit(kind="depth", depth=depth, columns=columns, tokens=tokens, path=path, round=round_,
                     queued_ms=round(time_ms(function, queued=True), 4), sustained_ms=round(sustained, 4),
                     sustained_tflops=round(2 * multiply_adds / sustained / 1e9, 1),
                     mj_per_call=round(energy_mj(function, seconds=1.0) or 0, 2))


def bench_lora_gemm(tokens: int, shapes: list[str], rank: int = 16) -> None:
    from litft.adapters import lora_gemm

    for shape in shapes:
        cases = lora_gemm_cases(tokens, shape, rank)
        for name, pairs, transposed in cases:
            flops = sum(2 * a.shape[0] * a.shape[1] * (b.shape[0] if transposed else b.shape[1]) for a, b in pairs)

            def cublas(pairs=pairs, transposed=transposed):
                return cublas_sum(pairs, transposed)

            base_a, base_b = pairs[0]
            timings = {"cublas": time_ms(cublas),
                       "cublas_first_base_gemm_alone": time_ms(lambda: base_a @ (base_b.t() if transposed else base_b))}
            variants = [(index, False, True) for index in range(len(lora_gemm.CONFIGS))]
            variants += [(0, True, True), (0, False, False), (0, True, False)]  # epilogue, rank-deep pair looped
            for index, store_through_tma, prefetch_low in variants:
                label = "triton_" + "x".join(map(str, lora_gemm.CONFIGS[index]))
                label += "_tma_store" * store_through_tma + "_low_looped" * (not prefetch_low)
                try:
                    timings[label] = time_ms(lambda: lora_gemm._run(
                        pairs, transposed, index, store_through_tma=store_through_tma, prefetch_low=prefetch_low))
                except Exception as error:  # noqa: BLE001 - a configuration too large for shared memory
                    emit(kind="lora_gemm", shape=shape, case=name, path=label, error=str(error)[:160])
            # Queued behind the GPU (as in a step), and sustained: enough calls (~0.5 s) that the GPU reaches its
            # power limit, as a training step's GEMMs run (NOTES.md, sections 17-18).
            sustained_calls = max(20, int(500 / timings["cublas"]))
            for label, function in (
                ("cublas", cublas),
                ("triton", lambda: lora_gemm._run(pairs, transposed, 0)),
                ("triton_group_rows_8", lambda: lora_gemm._run(pairs, transposed, 0, group_rows=8)),
                ("triton_group_rows_32", lambda: lora_gemm._run(pairs, transposed, 0, group_rows=32)),
                ("cublas_again", cublas),  # the GPU warms through the sequence: the first and last agree or not
            ):
                timings[label + "_queued"] = time_ms(function, queued=True)
                timings[label + "_sustained"] = time_ms(function, repeats=sustained_calls, queued=True)
            for path, elapsed in timings.items():
                emit(kind="lora_gemm", shape=shape, case=name, tokens=tokens, path=path, ms=round(elapsed, 4),
                     tflops=round(flops / elapsed / 1e9, 1))
            for path, function in (("cublas", cublas), ("triton", lambda: lora_gemm._run(pairs, transposed, 0))):
                torch.cuda.synchronize()
                began = time.perf_counter()
                for _ in range(20):
                    function()
                emit(kind="lora_gemm_host", shape=shape, case=name, path=path,
                     host_us_per_call=round((time.perf_counter() - began) / 20 * 1e6, 1))
            torch.cuda.synchronize()
            # What `auto` keeps, and the same timing with the GPU idle as each round starts (the host's launches
            # timed too: how `auto` measured before NOTES.md section 15).
            queue_ahead = lora_gemm.QUEUE_AHEAD_CYCLES
            for label, cycles in (("auto", queue_ahead), ("auto_rounds_from_idle", 0)):
                lora_gemm.QUEUE_AHEAD_CYCLES = cycles
                lora_gemm._choices.clear()
                lora_gemm.sum_of_products(pairs, transposed, cublas)
                emit(kind="lora_gemm_choice", shape=shape, case=name, timing=label, choice=lora_gemm.choices()[0])
            lora_gemm.QUEUE_AHEAD_CYCLES = queue_ahead


def bench_extended_reduction(tokens: int, shapes: list[str]) -> None:
    """A projection and its adapter as ONE cuBLAS GEMM whose reduction runs over the base operand and then the
    rank-deep one: forward [x | low] @ [W | B]^T (the operands (M, K + r) and (N, K + r), each a view into a
    buffer whose rows hold both), input gradient [dy | g_low] @ [W; sA] ((M, N + r) and (N + r, K)). Against
    cuBLAS's pair (the grouped operator's fallback), lora_gemm's kernel and the base GEMM alone: queued,
    sustained (~0.5 s, the power limit) and millijoules per call, in alternating rounds. Also the gated forward:
    lora_gemm.gated_projections' one kernel against the extended GEMM over gate and up then the gated product.
    Whether cuBLAS's clustered kernels, without the extra pass over an output-sized tensor, spend less energy per
    call than our kernel (NOTES.md, section 25)."""
    from litft.adapters import gated_activation, lora_gemm

    for shape in shapes:
        for name, pairs, transposed in lora_gemm_cases(tokens, shape):
            *base, (low, update) = pairs
            rows, rank = low.shape
            if transposed:  # one base pair: x (M, K), W (N, K); low (M, r), B (N, r)
                (x, weight), = base
                depth = x.shape[1]
                wide = torch.empty(rows, depth + 64, device="cuda", dtype=x.dtype)  # row pitch a multiple of 64
                left = wide[:, : depth + rank]
                left[:, :depth].copy_(x)
                left[:, depth:].copy_(low)
                right = torch.cat([weight, update], dim=1)  # (N, K + r)
                exact_left = left.contiguous()

                def extended(left=left, right=right):
                    return left @ right.t()

                def extended_exact(left=exact_left, right=right):
                    return left @ right.t()

                def base_alone(x=x, weight=weight):
                    return x @ weight.t()
            else:  # base pairs dy_i (M, N_i), W_i (N_i, K); g_low (M, r), sA (r, K)
                width = sum(grad.shape[1] for grad, _ in base)
                wide = torch.empty(rows, width + 64, device="cuda", dtype=low.dtype)
                left = wide[:, : width + rank]
                start = 0
                for grad, _ in base:
                    left[:, start : start + grad.shape[1]].copy_(grad)
                    start += grad.shape[1]
                left[:, start:].copy_(low)
                right = torch.cat([weight for _, weight in base] + [update], dim=0)  # (N + r, K)
                exact_left = left.contiguous()

                def extended(left=left, right=right):
                    return left @ right

                def extended_exact(left=exact_left, right=right):
                    return left @ right

                def base_alone(base=base):
                    out = base[0][0] @ base[0][1]
                    for grad, weight in base[1:]:
                        out.addmm_(grad, weight)
                    return out
            reference = cublas_sum(pairs, transposed).float()
            error = ((extended().float() - reference).abs().max() / reference.abs().max()).item()
            paths = {"cublas_pair": lambda pairs=pairs, transposed=transposed: cublas_sum(pairs, transposed),
                     "triton": lambda pairs=pairs, transposed=transposed: lora_gemm._run(pairs, transposed, 0),
                     "cublas_extended": extended, "cublas_extended_exact_pitch": extended_exact,
                     "cublas_base_alone": base_alone}
            sustained_calls = max(20, int(500 / time_ms(paths["cublas_pair"], queued=True)))
            for round_ in range(2):
                for path, function in paths.items():
                    emit(kind="extended_reduction", shape=shape, case=name, tokens=tokens, path=path, round=round_,
                         relative_error=round(error, 5) if path.startswith("cublas_ext") else None,
                         queued_ms=round(time_ms(function, queued=True), 4),
                         sustained_ms=round(time_ms(function, repeats=sustained_calls, queued=True), 4),
                         mj_per_call=round(energy_mj(function, seconds=1.0) or 0, 2))
        # The gated forward: gate and up with their adapters and h = act(gate) * up.
        hidden, inter = PROJECTIONS[shape]["gate_up"]
        rank = 16
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        low = torch.randn(tokens, 2 * rank, device="cuda", dtype=torch.bfloat16)
        weights = torch.randn(2 * inter, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5
        updates = (torch.randn(inter, rank, device="cuda", dtype=torch.bfloat16),
                   torch.randn(inter, rank, device="cuda", dtype=torch.bfloat16))
        blocks = torch.block_diag(*updates)
        wide = torch.empty(tokens, hidden + 64, device="cuda", dtype=x.dtype)
        left = wide[:, : hidden + 2 * rank]
        left[:, :hidden].copy_(x)
        left[:, hidden:].copy_(low)
        right = torch.cat([weights, blocks], dim=1)  # (2I, K + 2r)

        def fused():
            return lora_gemm._run_gated(x, weights, low, blocks, "silu", 0)

        def extended_then_product():
            both = left @ right.t()
            gate, up = both[:, :inter], both[:, inter:]
            return gate, up, gated_activation.gated_product(gate, up, "silu")

        def extended_alone():
            return left @ right.t()

        sustained_calls = max(20, int(500 / time_ms(fused, queued=True)))
        for round_ in range(2):
            for path, function in (("fused_kernel", fused), ("cublas_extended_then_product", extended_then_product),
                                   ("cublas_extended_alone", extended_alone)):
                emit(kind="extended_reduction", shape=shape, case="forward_gate_up_gated", tokens=tokens, path=path,
                     round=round_, queued_ms=round(time_ms(function, queued=True), 4),
                     sustained_ms=round(time_ms(function, repeats=sustained_calls, queued=True), 4),
                     mj_per_call=round(energy_mj(function, seconds=1.0) or 0, 2))
        # Whether torch.mm writes a column block of a wider buffer in place (ld > columns) at a plain GEMM's time.
        factor = right[: 2 * rank, :hidden]
        torch.mm(x, factor.t(), out=wide[:, hidden : hidden + 2 * rank])
        emit(kind="extended_reduction_out_view", shape=shape,
             matches=bool(torch.equal(wide[:, hidden : hidden + 2 * rank], x @ factor.t())),
             into_view_ms=round(time_ms(lambda: torch.mm(x, factor.t(), out=wide[:, hidden : hidden + 2 * rank])), 4),
             contiguous_ms=round(time_ms(lambda: x @ factor.t()), 4))


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


def bench_qkv(tokens: int, rank: int = 16) -> None:
    device, dtype = "cuda", torch.bfloat16
    for (shape, projections), group in itertools.product(PROJECTIONS.items(), ("qkv", "gate_up")):
        hidden, kv_width = projections["kv"]
        sizes = [projections["q"][1], kv_width, kv_width] if group == "qkv" else [projections["gate_up"][1]] * 2
        weights = [torch.randn(size, hidden, device=device, dtype=dtype) * 0.02 for size in sizes]
        joined_weight = torch.cat(weights)
        stacked_a = torch.randn(rank * len(sizes), hidden, device=device, dtype=dtype) * 0.02
        updates = [torch.randn(size, rank, device=device, dtype=dtype) * 0.02 for size in sizes]
        block_diagonal_b = torch.block_diag(*updates)  # (sum N, 3r): the joined layout's B
        x = torch.randn(tokens, hidden, device=device, dtype=dtype)
        grads = [torch.randn(tokens, size, device=device, dtype=dtype) for size in sizes]
        joined_grad = torch.cat(grads, dim=1)

        def separate_forward():
            low = x @ stacked_a.t()
            for index, (weight, update) in enumerate(zip(weights, updates)):
                (low[:, index * rank : (index + 1) * rank] @ update.t()).addmm_(x, weight.t())

        def joined_forward():
            (x @ stacked_a.t() @ block_diagonal_b.t()).addmm_(x, joined_weight.t())

        def separate_backward():
            grad_low = torch.cat([grad @ update for grad, update in zip(grads, updates)], dim=1)
            grad_x = grad_low @ stacked_a
            for grad, weight in zip(grads, weights):
                grad_x.addmm_(grad, weight)

        def joined_backward():
            (joined_grad @ block_diagonal_b @ stacked_a).addmm_(joined_grad, joined_weight)

        for case, step in [("separate_forward", separate_forward), ("joined_forward", joined_forward),
                           ("separate_input_grad", separate_backward), ("joined_input_grad", joined_backward)]:
            emit(kind="qkv", shape=shape, group=group, tokens=tokens, case=case, ms=round(time_ms(step), 4))


def bench_nf4() -> None:
    import bitsandbytes.functional as bnb_functional

    from litft.adapters import nf4_dequantize, quantization

    for out_features, in_features in [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096)]:
        weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
        packed, state = bnb_functional.quantize_4bit(
            weight, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.bfloat16
        )
        tensors = [state.absmax, state.state2.absmax, state.state2.code, state.offset]
        gigabytes = out_features * in_features * 2.5 / 1e9  # half a byte read, two written per value

        def dequantize():
            return quantization.dequantize_weight(
                packed, tensors, "bnb.nf4", out_features, in_features, state.state2.blocksize, torch.bfloat16
            )

        chosen = (nf4_dequantize.BYTES_PER_PROGRAM, nf4_dequantize.WARPS, nf4_dequantize.PER_BLOCK,
                  nf4_dequantize.BLOCKS_PER_PROGRAM, nf4_dequantize.BLOCK_WARPS)

        def measure(**settings):
            # queued: the kernels' time, as in a training step, where the host runs ahead (not each call's launch)
            microseconds = time_ms(dequantize, repeats=200, queued=True) * 1e3
            emit(kind="nf4", shape=[out_features, in_features], **settings, queued_us=round(microseconds, 1),
                 tb_per_s=round(gigabytes / microseconds * 1e3, 2))

        quantization.use_nf4_kernel = False
        measure(kernel="bitsandbytes")
        quantization.use_nf4_kernel = True
        for _ in range(2):  # two rounds: the per-byte kernel (NOTES.md section 10), then the per-block one
            nf4_dequantize.PER_BLOCK = False
            for program_bytes, warps in ((1024, 4), (2048, 8)):
                nf4_dequantize.BYTES_PER_PROGRAM, nf4_dequantize.WARPS = program_bytes, warps
                measure(kernel="litft per byte", program_bytes=program_bytes, warps=warps)
            nf4_dequantize.PER_BLOCK = True
            for blocks in (16, 32, 64, 128):
                for warps in (4, 8):
                    nf4_dequantize.BLOCKS_PER_PROGRAM, nf4_dequantize.BLOCK_WARPS = blocks, warps
                    measure(kernel="litft per block", blocks_per_program=blocks, warps=warps)
        (nf4_dequantize.BYTES_PER_PROGRAM, nf4_dequantize.WARPS, nf4_dequantize.PER_BLOCK,
         nf4_dequantize.BLOCKS_PER_PROGRAM, nf4_dequantize.BLOCK_WARPS) = chosen


def bench_cross_entropy(rows: int = 2093, vocab: int = 128256) -> None:
    from litft.training import cross_entropy_kernel
    from litft.training.loss import cross_entropy_chunk

    torch.manual_seed(0)
    logits = (torch.randn(rows, vocab, device="cuda") * 3).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    # one read of the logits and one write of their gradient: the traffic the kernel aims at
    gigabytes = 2 * logits.numel() * logits.element_size() / 1e9
    compiled = torch.compile(cross_entropy_chunk, dynamic=True)
    for softcap in (None, 30.0):
        milliseconds = time_ms(lambda: compiled(logits, targets, softcap))
        emit(kind="cross_entropy", rows=rows, vocab=vocab, softcap=softcap, path="compiled", ms=round(milliseconds, 3),
             tb_per_s=round(gigabytes / milliseconds, 2))
    chosen = cross_entropy_kernel.BLOCK, cross_entropy_kernel.WARPS, cross_entropy_kernel.PROGRAMS_PER_MULTIPROCESSOR
    scratch = logits.clone()
    for block, warps, per_multiprocessor in itertools.product((2048, 4096, 8192), (8, 16, 32), (1, 2, 4)):
        cross_entropy_kernel.BLOCK, cross_entropy_kernel.WARPS = block, warps
        cross_entropy_kernel.PROGRAMS_PER_MULTIPROCESSOR = per_multiprocessor

        def kernel():
            scratch.copy_(logits)  # the kernel writes over its input; the copy is timed apart and subtracted
            return cross_entropy_kernel.cross_entropy_in_place(scratch, targets, None)

        try:
            milliseconds = time_ms(kernel) - time_ms(lambda: scratch.copy_(logits))
        except Exception as error:  # noqa: BLE001 - a block too large for the registers
            emit(kind="cross_entropy", path="kernel", block=block, warps=warps, error=str(error)[:160])
            continue
        emit(kind="cross_entropy", rows=rows, vocab=vocab, path="kernel", block=block, warps=warps,
             programs_per_multiprocessor=per_multiprocessor, ms=round(milliseconds, 3),
             tb_per_s=round(gigabytes / milliseconds, 2))
    cross_entropy_kernel.BLOCK, cross_entropy_kernel.WARPS, cross_entropy_kernel.PROGRAMS_PER_MULTIPROCESSOR = chosen
    scratch.copy_(logits)
    emit(kind="cross_entropy", path="kernel_chosen", block=chosen[0], warps=chosen[1], programs_per_multiprocessor=chosen[2],
         softcap=30.0, ms=round(time_ms(lambda: cross_entropy_kernel.cross_entropy_in_place(scratch.copy_(logits), targets, 30.0))
                                - time_ms(lambda: scratch.copy_(logits)), 3))


# The kernel's configurations timed (keyword arguments of fused_adapter_gradients; unnamed ones take the
# module's defaults): the defaults first, then programs per multiprocessor, pipeline depth, and block shapes from
# short-and-wide to tall.
ADAPTER_GRADIENT_CONFIGS = [
    {},
    dict(programs_per_multiprocessor=1),
    dict(programs_per_multiprocessor=4, largest_partial_share=1 / 4),
    dict(stages=4),
    dict(stages=2),
    dict(block_rows=64, warps=8),
    dict(block_rows=64, block_columns=256, warps=4),
    dict(block_rows=16, block_columns=1024),
    dict(block_rows=64, block_columns=1024, stages=2, programs_per_multiprocessor=1),
    dict(block_rows=128, block_columns=256, warps=8, stages=2),
    # narrow gradients (1,024 columns are two 512-column groups): more, smaller column blocks, more row groups
    dict(block_columns=256),
    dict(block_columns=256, largest_partial_share=1 / 4),
    dict(block_columns=128, largest_partial_share=1 / 4),
    dict(block_rows=64, block_columns=256, largest_partial_share=1 / 4),
]


def bench_adapter_gradients(tokens: int, rank: int = 16) -> None:
    from litft.adapters import adapter_gradients as kernel
    from litft.triton_support import multiprocessor_count

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    joined = randn(tokens, 6144)  # llama-8b's q, k and v gradients side by side (4,096 + 1,024 + 1,024)
    cases = [("width_14336", randn(tokens, 14336)), ("width_4096", randn(tokens, 4096)),
             ("width_1024", randn(tokens, 1024)), ("joined_qkv_q_4096", joined[:, :4096]),
             ("joined_qkv_k_1024", joined[:, 4096:5120])]
    multiprocessors = multiprocessor_count(joined.device)
    for name, grad in cases:
        rows, columns = grad.shape
        update, low = randn(columns, rank) * 0.02, randn(rows, rank)
        gigabytes = grad.numel() * grad.element_size() / 1e9  # one read of grad
        exact = (grad.float() @ update.float(), grad.float().t() @ low.float())
        case = dict(kind="adapter_gradients", case=name, rows=rows, columns=columns, row_stride=grad.stride(0),
                    rank=rank)

        def relative_error(results) -> float:
            return max(((result.float() - reference).norm() / reference.norm()).item()
                       for result, reference in zip(results, exact))

        for path, function in [("torch_two_matmuls", lambda: (grad @ update, grad.t() @ low)),
                               ("torch_grad_low_matmul_alone", lambda: grad @ update),
                               ("torch_grad_update_matmul_alone", lambda: grad.t() @ low)]:
            milliseconds, queued = time_ms(function), time_ms(function, queued=True)
            record = dict(**case, path=path, ms=round(milliseconds, 4), queued_ms=round(queued, 4),
                          gb_per_s=round(gigabytes / queued * 1e3, 1))
            if path == "torch_two_matmuls":
                record["relative_error"] = round(relative_error(function()), 5)
            emit(**record)
        for config in ADAPTER_GRADIENT_CONFIGS:
            settings = dict(block_rows=kernel.BLOCK_ROWS, block_columns=kernel.BLOCK_COLUMNS, stages=kernel.STAGES,
                            programs_per_multiprocessor=kernel.PROGRAMS_PER_MULTIPROCESSOR,
                            largest_partial_share=kernel.LARGEST_PARTIAL_SHARE)
            settings.update(config)
            settings.setdefault("warps", kernel.default_warps(settings["block_columns"], rank))
            split = kernel.plan(rows, columns, rank, grad.element_size(), multiprocessors,
                                **{key: settings[key] for key in ("block_rows", "block_columns",
                                                                   "programs_per_multiprocessor",
                                                                   "largest_partial_share")})
            partial_bytes = (split.column_groups * rows + split.row_groups * columns) * rank * 4
            described = dict(**case, path="kernel", **settings, programs=split.programs,
                             partial_share=round(partial_bytes / (gigabytes * 1e9), 4))
            try:
                milliseconds = time_ms(lambda: kernel.fused_adapter_gradients(grad, update, low, **settings))
                queued = time_ms(lambda: kernel.fused_adapter_gradients(grad, update, low, **settings), queued=True)
            except Exception as error:  # noqa: BLE001 - a configuration too large for shared memory or registers
                emit(**described, error=str(error)[:160])
                continue
            error = relative_error(kernel.fused_adapter_gradients(grad, update, low, **settings))
            emit(**described, ms=round(milliseconds, 4), queued_ms=round(queued, 4),
                 gb_per_s=round(gigabytes / queued * 1e3, 1), relative_error=round(error, 5))


def bench_gated_down(tokens: int, shapes: list[str], rank: int = 16) -> None:
    """The down projection's gated activation (litft.adapters.lora_gated_down) against what torch.compile ran
    before: forward act(gate) * up; backward h recomputed, g_low^T @ h, and the activation's gradient, each timed
    alone and as inductor fuses them, then the operator's kernel over a sweep of tiles."""
    from litft.adapters import gated_activation, lora_gated_down

    for shape in shapes:
        width = PROJECTIONS[shape]["down"][0]
        gate, up, grad_product = (torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        grad_low = torch.randn(tokens, rank, device="cuda", dtype=torch.bfloat16)
        gigabytes = tokens * width * 2 / 1e9  # one (tokens x width) bf16 tensor

        @torch.compile
        def product_compiled(gate, up):
            return F.silu(gate.float()).mul(up.float()).to(gate.dtype)

        @torch.compile
        def recompute_compiled(gate, up):
            return F.silu(gate) * up

        @torch.compile
        def backward_compiled(grad_product, gate, up):
            sigmoid = torch.sigmoid(gate.float())
            value = gate.float() * sigmoid
            grad_gate = grad_product.float() * up.float() * sigmoid * (1 + gate.float() * (1 - sigmoid))
            return grad_gate.to(gate.dtype), (grad_product.float() * value).to(gate.dtype)

        product = recompute_compiled(gate, up)
        ms = time_ms(lambda: product_compiled(gate, up))
        emit(section="gated_down", shape=shape, what="forward, inductor", ms=ms)
        for block in (1024, 2048, 4096):
            gated_activation.PRODUCT_BLOCK = block
            ms = time_ms(lambda: gated_activation.gated_product(gate, up, "silu"))
            emit(section="gated_down", shape=shape, what=f"forward, kernel block {block}", ms=ms,
                 gb_per_s=round(3 * gigabytes / ms * 1e3))
        gated_activation.PRODUCT_BLOCK = 2048
        before = {
            "recompute h": lambda: recompute_compiled(gate, up),
            "g_low^T @ h": lambda: grad_low.t() @ product,
            "activation backward": lambda: backward_compiled(grad_product, gate, up),
        }
        total = 0.0
        for what, function in before.items():
            ms = time_ms(function)
            total += ms
            emit(section="gated_down", shape=shape, what=f"backward before: {what}", ms=ms)
        emit(section="gated_down", shape=shape, what="backward before: all three", ms=total)
        for rows, columns, warps, groups in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (16, 32)):
            if rows * columns > 16384:
                continue
            try:
                ms = time_ms(lambda: lora_gated_down.gated_backward(
                    grad_product, gate, up, grad_low, "silu", block_rows=rows, block_columns=columns, warps=warps,
                    max_row_groups=groups))
            except Exception as error:  # a tile that does not fit the GPU's shared memory
                emit(section="gated_down", shape=shape, tile=[rows, columns, warps, groups], error=repr(error)[:200])
                continue
            emit(section="gated_down", shape=shape, what="backward, kernel", tile=[rows, columns, warps, groups],
                 ms=ms, gb_per_s=round(5 * gigabytes / ms * 1e3))
        # Queued (the host ahead, as in a step), around the default tile: row blocks of 16, 2 warps, the software
        # pipeline's stages.
        for rows, columns, warps, stages in itertools.product((16, 32), (64, 128), (2, 4), (1, 2, 3, 4)):
            try:
                ms = time_ms(lambda: lora_gated_down.gated_backward(
                    grad_product, gate, up, grad_low, "silu", block_rows=rows, block_columns=columns, warps=warps,
                    stages=stages), queued=True)
            except Exception as error:  # a tile that does not fit the GPU's shared memory
                emit(section="gated_down", shape=shape, tile=[rows, columns, warps, stages], error=repr(error)[:200])
                continue
            emit(section="gated_down", shape=shape, what="backward, kernel, queued",
                 tile_warps_stages=[rows, columns, warps, stages], ms=ms, gb_per_s=round(5 * gigabytes / ms * 1e3))


def energy_mj(function, seconds: float = 2.0) -> float | None:
    """Millijoules per call from NVML's energy counter over ~`seconds` of back-to-back calls (None without NVML)."""
    if energy_counter_mj() is None:
        return None
    calls = max(10, int(seconds * 1e3 / time_ms(function, queued=True)))
    torch.cuda.synchronize()
    before = energy_counter_mj()
    for _ in range(calls):
        function()
    torch.cuda.synchronize()
    return (energy_counter_mj() - before) / calls


def bench_gated_projections(tokens: int, shapes: list[str], rank: int = 16) -> None:
    from litft.adapters import gated_activation, lora_gemm

    for shape in shapes:
        hidden, inter = PROJECTIONS[shape]["gate_up"]
        torch.manual_seed(0)

        def randn(*size):
            return torch.randn(*size, device="cuda", dtype=torch.bfloat16) / size[-1] ** 0.5

        x, low, weights = randn(tokens, hidden), randn(tokens, 2 * rank), randn(2 * inter, hidden)
        updates = (randn(inter, rank), randn(inter, rank))
        blocks = torch.block_diag(*updates)
        pairs = [[(x, weight), (low_i, update)]
                 for weight, low_i, update in zip(weights.chunk(2), low.split(rank, dim=1), updates)]

        def apart_kernel():
            gate, up = (lora_gemm._run(pair, True, 0) for pair in pairs)
            return gated_activation.gated_product(gate, up, "silu")

        def apart_cublas():
            gate, up = ((low_i @ update.t()).addmm_(x, weight.t()) for (_, weight), (low_i, update) in pairs)
            return gated_activation.gated_product(gate, up, "silu")

        def fused():
            return lora_gemm._run_gated(x, weights, low, blocks, "silu", 0)

        flops = 2 * 2 * tokens * hidden * inter
        sustained_calls = max(20, int(500 / time_ms(fused)))
        for path, function in (("apart_kernel", apart_kernel), ("apart_cublas", apart_cublas), ("fused", fused),
                               ("apart_kernel_again", apart_kernel)):
            record = dict(ms=time_ms(function), queued_ms=time_ms(function, queued=True),
                          sustained_ms=time_ms(function, repeats=sustained_calls, queued=True))
            record = {key: round(value, 4) for key, value in record.items()}
            energy = energy_mj(function)
            emit(kind="gated_projections", shape=shape, tokens=tokens, path=path, **record,
                 sustained_tflops=round(flops / record["sustained_ms"] / 1e9, 1),
                 mj_per_call=None if energy is None else round(energy, 2))


def down_backward_apart(operands, sum_of_products):
    """d gate of a gated down projection's backward, apart: d h through `sum_of_products`, then the activation's
    backward kernel."""
    from litft.adapters import lora_gated_down

    grad_output, weight, grad_low, lora_a, gate, up = operands
    grad_product = sum_of_products([(grad_output, weight), (grad_low, lora_a)])
    return lora_gated_down.gated_backward(grad_product, gate, up, grad_low, "silu")[0]


def bench_pingpong(tokens: int, shapes: list[str], rank: int = 16) -> None:
    """lora_gemm's kinds of call and the gated forward through cuBLAS, lora_gemm's Triton kernel and
    lora_gemm_pingpong's warp-specialized kernel: queued, sustained (~0.5 s of calls: the power limit) and
    millijoules per call, two alternating rounds; each path's largest difference from the Triton kernel's result.
    Also down's input gradient with the activation's backward (d gate the compared result): apart after either
    kernel, or in the warp-specialized kernel's epilogue."""
    from litft.adapters import lora_gemm, lora_gemm_pingpong

    for shape in shapes:
        cases = [(name, pairs, transposed, None) for name, pairs, transposed in lora_gemm_cases(tokens, shape, rank)]
        hidden, inter = PROJECTIONS[shape]["gate_up"]
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        weights = torch.randn(2 * inter, hidden, device="cuda", dtype=torch.bfloat16) / hidden**0.5
        low = torch.randn(tokens, 2 * rank, device="cuda", dtype=torch.bfloat16)
        blocks = torch.block_diag(*(torch.randn(inter, rank, device="cuda", dtype=torch.bfloat16) / rank**0.5
                                    for _ in range(2)))
        cases.append(("forward_gate_up_gated", None, None, (x, weights, low, blocks)))
        # down's input gradient with the activation's backward: (dy, W_down, g_low, sA, gate, up)
        backward = (torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16),
                    torch.randn(hidden, inter, device="cuda", dtype=torch.bfloat16) / hidden**0.5,
                    torch.randn(tokens, rank, device="cuda", dtype=torch.bfloat16),
                    torch.randn(rank, inter, device="cuda", dtype=torch.bfloat16) / rank**0.5,
                    torch.randn(tokens, inter, device="cuda", dtype=torch.bfloat16),
                    torch.randn(tokens, inter, device="cuda", dtype=torch.bfloat16))
        cases.append(("input_gradient_down_with_activation_backward", None, None, backward))
        for name, pairs, transposed, gated in cases:
            if name == "input_gradient_down_with_activation_backward":
                multiply_adds = tokens * hidden * inter
                paths = {"triton": lambda b=gated: down_backward_apart(b, lambda p: lora_gemm._run(p, False, 0)),
                         "pingpong": lambda b=gated: down_backward_apart(
                             b, lambda p: lora_gemm_pingpong.sum_of_products(p, False)),
                         "epilogue": lambda b=gated: lora_gemm_pingpong.gated_input_gradient(*b, "silu")[0]}
            elif gated is None:
                multiply_adds = sum(a.shape[0] * a.shape[1] * (b.shape[0] if transposed else b.shape[1])
                                    for a, b in pairs)
                paths = {"cublas": lambda p=pairs, t=transposed: cublas_sum(p, t),
                         "triton": lambda p=pairs, t=transposed: lora_gemm._run(p, t, 0),
                         "pingpong": lambda p=pairs, t=transposed: lora_gemm_pingpong.sum_of_products(p, t)}
            else:
                multiply_adds = tokens * hidden * 2 * inter
                paths = {"triton": lambda g=gated: lora_gemm._run_gated(*g, "silu", 0)[2],
                         "pingpong": lambda g=gated: lora_gemm_pingpong.gated_projections(*g, "silu")[2]}
            reference = paths["triton"]().float()
            sustained_calls = max(20, int(500 / time_ms(paths["triton"], queued=True)))
            for round_ in range(2):
                for path, function in paths.items():
                    difference = ((function().float() - reference).abs().max() / reference.abs().max()).item()
                    sustained = time_ms(function, repeats=sustained_calls, queued=True)
                    emit(kind="pingpong", shape=shape, case=name, tokens=tokens, path=path, round=round_,
                         queued_ms=round(time_ms(function, queued=True), 4), sustained_ms=round(sustained, 4),
                         sustained_tflops=round(2 * multiply_adds / sustained / 1e9, 1),
                         mj_per_call=round(energy_mj(function, seconds=1.0) or 0, 2),
                         max_difference_from_triton=round(difference, 5))


def bench_rotary(seq: int, shapes: list[str]) -> None:
    """q, k, v from the joined projection output into attention and back (causal, grouped-query), compiled as a
    block compiles it: split and rotated as written (autograd's backward, fused by inductor) against
    litft.models.rotary_heads (the same forward, one kernel of ours writing the joined gradient); then that kernel
    alone over its tokens per program and warps, on the gradients attention gave."""
    from litft.models import rotary_heads

    for shape in shapes:
        rows, heads, kv_heads, head_dim = ATTENTION[shape]
        width = (heads + 2 * kv_heads) * head_dim
        joined = torch.randn(rows, seq, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        positions = torch.arange(seq, device="cuda")[None].expand(rows, seq)
        frequencies = positions[..., None].float() / (500000 ** (torch.arange(0, head_dim, 2, device="cuda").float()
                                                                  / head_dim))
        angles = torch.cat((frequencies, frequencies), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        grad_output = torch.randn(rows, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)

        def attention(joined, cos, sin):
            q, k, v = rotary_heads.rotary_heads(joined, cos, sin, heads, kv_heads, head_dim)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        compiled = torch.compile(attention)
        gigabytes = 2 * joined.numel() * joined.element_size() / 1e9  # the backward's read of dq/dk/dv and write
        for label, enabled in (("as_written", False), ("rotary_heads", True)):
            rotary_heads.ENABLED = enabled
            torch._dynamo.reset()

            def step():
                y = compiled(joined, cos, sin)
                (grad,) = torch.autograd.grad(y, joined, grad_output)
                return grad

            step()
            emit(section="rotary", shape=shape, path=label, what="attention forward + backward, compiled",
                 ms=round(time_ms(step, queued=True), 4))
        rotary_heads.ENABLED = True
        q, k, v = (t.detach().requires_grad_() for t in rotary_heads.split_heads(
            joined.detach(), cos.to(torch.bfloat16), sin.to(torch.bfloat16), heads, kv_heads, head_dim))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        grads = torch.autograd.grad(y, (q, k, v), grad_output)
        emit(section="rotary", shape=shape, what="attention's gradient strides",
             strides=[list(grad.stride()) for grad in grads])
        tables = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
        defaults = rotary_heads.BLOCK_TOKENS, rotary_heads.WARPS
        for tokens, warps in itertools.product((16, 32, 64, 128), (2, 4, 8)):
            rotary_heads.BLOCK_TOKENS, rotary_heads.WARPS = tokens, warps
            ms = time_ms(lambda: rotary_heads.rotary_heads_backward(*grads, *tables), queued=True)
            emit(section="rotary", shape=shape, what="backward kernel", tokens=tokens, warps=warps, ms=round(ms, 4),
                 gb_per_s=round(gigabytes / ms * 1e3))
        rotary_heads.BLOCK_TOKENS, rotary_heads.WARPS = defaults


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="attention,gemm,lora,qkv,nf4")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per GEMM (rows x sequence length)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--shapes", default="llama-8b,llama-1b", help="geometries for gemm_backends")
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
    if "qkv" in chosen:
        bench_qkv(args.tokens)
    if "nf4" in chosen:
        bench_nf4()
    if "lora_gemm" in chosen:
        bench_lora_gemm(args.tokens, args.shapes.split(","))
    if "gemm_backends" in chosen:
        bench_gemm_backends(args.tokens, args.shapes.split(","))
    if "cross_entropy" in chosen:
        bench_cross_entropy()
    if "adapter_gradients" in chosen:
        bench_adapter_gradients(args.tokens)
    if "gated_down" in chosen:
        bench_gated_down(args.tokens, args.shapes.split(","))
    if "rotary" in chosen:
        bench_rotary(args.seq, args.shapes.split(","))
    if "gated_projections" in chosen:
        bench_gated_projections(args.tokens, args.shapes.split(","))
    if "lora_gemm_energy" in chosen:
        bench_lora_gemm_energy(args.tokens, args.shapes.split(","))
    if "depth" in chosen:
        bench_depth(args.tokens)
    if "extended_reduction" in chosen:
        bench_extended_reduction(args.tokens, args.shapes.split(","))
    if "pingpong" in chosen:
        bench_pingpong(args.tokens, args.shapes.split(","))


if __name__ == "__main__":
    main()
