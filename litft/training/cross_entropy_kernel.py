"""Cross-entropy of a chunk of logits and its gradient in one Triton kernel, the gradient written over the logits.

`litft.training.loss` projects the trained positions onto the vocabulary a chunk at a time (~512 MiB of logits)
and needs, per chunk, sum_i CE(logits_i, y_i) and d/d logits. torch.compile of the plain tensor code reads each
row of logits three times (the maximum, the sum of exponentials, the gradient) and writes the gradient to a new
tensor: on an H200 that ran at ~0.46 us per token with a 128k vocabulary, 4% of a LoRA llama-1b step
(benchmarks/NOTES.md, section 15). Here each program takes whole rows, one at a time:
    pass 1: a running maximum and sum of exponentials over the row (one read), and the target's logit;
    pass 2: softmax - one_hot (times the soft-cap's derivative), written in place of the logits.
Writing in place also drops the gradient's own chunk-sized allocation, alive at the step's peak (the end of the
forward): 0.5 GiB less on llama's 128k vocabulary.

Numerics follow `loss.cross_entropy_chunk`: float32 throughout, the gradient rounded once to the logits' dtype.
Only the summation order of the log-normalizer differs (blockwise here), within float32's rounding.
"""

from __future__ import annotations

import functools

import torch

from litft.triton_support import kernels_run_on, launching_on, multiprocessor_count

# Measured on an H200 over a 2,093 x 128,256 bf16 chunk (benchmarks/bench_kernels.py --only cross_entropy,
# NOTES.md section 15): 4,096 columns per step, 16 warps and four programs per multiprocessor took 0.44 ms against
# torch.compile's 0.89; one program per multiprocessor (whose rows would stay in L2) left memory idle, 0.70 ms.
BLOCK = 4096
WARPS = 16
PROGRAMS_PER_MULTIPROCESSOR = 4


_maximum = _add = None  # the row reductions' combining functions, module globals once built (see _kernel)


@functools.cache
def _kernel():
    # Built on first use: Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) is chosen when a function is
    # decorated. Nothing here calls triton.language's own jitted helpers (tl.sum, tl.max, tl.zeros, tl.sigmoid):
    # they are built when triton is imported and are not interpreted in a process that chose the interpreter later.
    # The reductions combine through functions of ours, module globals because Triton resolves calls through them.
    global _maximum, _add
    import triton
    import triton.language as tl

    def maximum(a, b):
        return tl.maximum(a, b)

    def add(a, b):
        return a + b

    _maximum, _add = triton.jit(maximum), triton.jit(add)

    @triton.jit
    def cross_entropy_rows(
        logits_ptr, row_stride, targets_ptr, losses_ptr, rows, vocab, softcap,
        HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr, PROGRAMS: tl.constexpr,
    ):
        columns = tl.arange(0, BLOCK)
        for row in tl.range(tl.program_id(0), rows, PROGRAMS):
            base = logits_ptr + (tl.full([], 0, tl.int64) + row) * row_stride  # 64-bit: large chunks
            # Pass 1: per lane, a running maximum and the sum of exp(x - maximum); lanes that have seen only
            # padding keep -inf and add nothing.
            running_max = tl.full([BLOCK], float("-inf"), tl.float32)
            running_sum = tl.full([BLOCK], 0.0, tl.float32)
            for start in tl.range(0, vocab, BLOCK):
                index = start + columns
                x = tl.load(base + index, mask=index < vocab, other=float("-inf")).to(tl.float32)
                if HAS_SOFTCAP:
                    x = softcap * (2 / (1 + tl.exp(-2 * x / softcap)) - 1)  # softcap * tanh(x / softcap)
                new_max = tl.maximum(running_max, x)
                seen = new_max > float("-inf")
                running_sum = tl.where(seen, running_sum * tl.exp(running_max - new_max) + tl.exp(x - new_max), 0.0)
                running_max = new_max
            row_max = tl.reduce(running_max, 0, _maximum)
            total = tl.reduce(tl.where(running_max > float("-inf"), running_sum * tl.exp(running_max - row_max), 0.0),
                              0, _add)
            log_normalizer = row_max + tl.log(total)
            target = tl.load(targets_ptr + row)
            # Masked so that a target outside the vocabulary reads nothing out of bounds (the embedding lookup of
            # the same token ids has refused such an id before the loss runs).
            target_logit = tl.load(base + target, mask=(target >= 0) & (target < vocab), other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                target_logit = softcap * (2 / (1 + tl.exp(-2 * target_logit / softcap)) - 1)
            tl.store(losses_ptr + row, log_normalizer - target_logit)
            # Pass 2: d CE / d logits = softmax - one_hot, in place of the logits.
            for start in tl.range(0, vocab, BLOCK):
                index = start + columns
                inside = index < vocab
                x = tl.load(base + index, mask=inside, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    capped = 2 / (1 + tl.exp(-2 * x / softcap)) - 1
                    x = softcap * capped
                grad = tl.exp(x - log_normalizer) - tl.where(index == target, 1.0, 0.0)
                if HAS_SOFTCAP:
                    grad = grad * (1.0 - capped * capped)
                tl.store(base + index, grad.to(logits_ptr.dtype.element_ty), mask=inside)

    return cross_entropy_rows


def can_run(logits: torch.Tensor) -> bool:
    """Whether the kernel takes these logits: a CUDA tensor (or any, under Triton's interpreter) whose rows are
    contiguous, with Triton importable."""
    return (
        kernels_run_on(logits)
        and logits.dim() == 2
        and logits.stride(1) == 1
        and logits.dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


def cross_entropy_in_place(
    logits: torch.Tensor, targets: torch.Tensor, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i CE(softcap(logits_i), y_i) as a float32 scalar, and its gradient with respect to `logits` (n, V),
    written into `logits` and returned (the logits are gone afterwards). Targets must lie in [0, V): the caller
    passes only trained positions."""
    rows, vocab = logits.shape
    targets = targets.contiguous()  # read one per row
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        programs = min(rows, multiprocessor_count(logits.device) * PROGRAMS_PER_MULTIPROCESSOR)
        with launching_on(logits):
            _kernel()[(programs,)](
                logits, logits.stride(0), targets, losses, rows, vocab, float(softcap or 0.0),
                HAS_SOFTCAP=softcap is not None, BLOCK=BLOCK, PROGRAMS=programs, num_warps=WARPS,
            )
    return losses.sum(), logits

