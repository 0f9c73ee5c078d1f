"""Adapter dropout inside the grouped LoRA operator (`litft.adapters.lora_projections`).

Each adapter of a group reads x through a dropout mask of its own (PEFT's semantics: one `nn.Dropout` per layer),
and nothing of the mask is kept for the backward: the operator saves one seed per call, adapter i's mask is drawn
from seed + i, and the backward draws it again. Kept masks (or the dropped copies of x that autograd keeps when
each layer runs on its own) cost 1-3 bytes per element of every adapted layer's input: on LoRA llama-1b 8 x 2048
with dropout 0.05 the layers run one by one peaked at 31.8 GiB against 16.97 without dropout (benchmarks/NOTES.md,
section 13).

On a GPU (or in Triton's interpreter) a mask is never written: each element's keep-or-drop comes from Philox
counters (seed, element index / 4: one evaluation serves four elements) inside the kernel that applies it, so the
forward's masked copy of x is one pass over x, and the backward adds an adapter's share of the input gradient
through its mask in one pass. Elsewhere the mask is drawn with torch's Bernoulli sampling from a generator seeded
with the seed. Both keep an element with probability 1 - p; they draw different masks for a seed, each the same
every time. The 1 / (1 - p) rescaling is the caller's (it rides on the small A factor).
"""

from __future__ import annotations

import functools

import torch

from litft.triton_support import kernels_run_on, launching_on

ELEMENTS_PER_PROGRAM = 2048
# Philox counters are 32-bit: a larger tensor would repeat its mask; it takes the torch path instead.
LARGEST_KERNEL_TENSOR = 2**31 - 1


def uses_kernels(x: torch.Tensor) -> bool:
    """Whether masks for `x` come from the Triton kernels (a CUDA tensor, or Triton's interpreter on CPU)."""
    return kernels_run_on(x) and x.numel() <= LARGEST_KERNEL_TENSOR


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def masked_copy(x_ptr, out_ptr, count, seed, dropout, ELEMENTS: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * ELEMENTS
        index = start + tl.arange(0, ELEMENTS)
        in_range = index < count
        x = tl.load(x_ptr + index, mask=in_range, other=0)
        # One Philox evaluation gives four uniforms: element 4n + c keeps or drops by the c-th of counter n's (per
        # element, Philox's ten rounds made the kernel compute-bound: ~0.6 TB/s on an H200, NOTES.md section 13).
        r0, r1, r2, r3 = tl.rand4x(seed, (start // 4 + tl.arange(0, ELEMENTS // 4)).to(tl.int32))
        keep = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [ELEMENTS]) >= dropout
        tl.store(out_ptr + index, tl.where(keep, x, 0.0).to(out_ptr.dtype.element_ty), mask=in_range)

    @triton.jit
    def add_masked(product_ptr, grad_ptr, count, seed, dropout, scale, ACCUMULATE: tl.constexpr,
                   ELEMENTS: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * ELEMENTS
        index = start + tl.arange(0, ELEMENTS)
        in_range = index < count
        product = tl.load(product_ptr + index, mask=in_range, other=0).to(tl.float32)
        # The same mask as masked_copy's for the same seed and element.
        r0, r1, r2, r3 = tl.rand4x(seed, (start // 4 + tl.arange(0, ELEMENTS // 4)).to(tl.int32))
        keep = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [ELEMENTS]) >= dropout
        value = tl.where(keep, product * scale, 0.0)
        if ACCUMULATE:
            value += tl.load(grad_ptr + index, mask=in_range, other=0).to(tl.float32)
        tl.store(grad_ptr + index, value.to(grad_ptr.dtype.element_ty), mask=in_range)

    return masked_copy, add_masked


def _launch(kernel, tensor: torch.Tensor, *arguments, **constants) -> None:
    import triton

    grid = (triton.cdiv(tensor.numel(), ELEMENTS_PER_PROGRAM),)
    with launching_on(tensor):
        kernel[grid](*arguments, ELEMENTS=ELEMENTS_PER_PROGRAM, **constants)


def mask(like: torch.Tensor, seed: int, dropout: float) -> torch.Tensor:
    """The mask drawn from `seed` for a tensor like `like`: 1 where an element is kept, 0 where it is dropped, in
    its dtype. The operator never materializes it on a GPU; the tests compare against it."""
    if uses_kernels(like):
        return masked_input(torch.ones_like(like), seed, dropout)
    generator = torch.Generator(device=like.device)
    generator.manual_seed(seed)
    return torch.empty_like(like).bernoulli_(1 - dropout, generator=generator)


def masked_input(x: torch.Tensor, seed: int, dropout: float) -> torch.Tensor:
    """x with the elements that `seed`'s mask drops set to zero (not rescaled), a new contiguous tensor."""
    x = x.contiguous()
    if not uses_kernels(x):
        return x * mask(x, seed, dropout)
    out = torch.empty_like(x)
    _launch(_kernels()[0], x, x, out, x.numel(), seed, dropout)
    return out


def add_masked(
    grad: torch.Tensor | None, product: torch.Tensor, seed: int, dropout: float, scale: float
) -> torch.Tensor:
    """grad + product * mask * scale, into `grad` (or into `product` when `grad` is None, the first adapter's)."""
    product = product.contiguous()
    if not uses_kernels(product):
        through_mask = product.mul_(mask(product, seed, dropout)).mul_(scale)
        return through_mask if grad is None else grad.add_(through_mask)
    target = product if grad is None else grad
    _launch(_kernels()[1], product, product, target, product.numel(), seed, dropout, scale,
            ACCUMULATE=grad is not None)
    return target
