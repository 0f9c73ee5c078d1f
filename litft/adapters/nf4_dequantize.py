"""NF4 dequantization in one Triton kernel: the QLoRA base weight, rebuilt for each matmul, forward and backward.

bitsandbytes rebuilds a double-quantized weight in three kernels (the block scales from their 8-bit codes, then
their offset added, then the 4-bit values), and its 4-bit kernel streamed ~1.9 TB/s over a llama-8b step on an
H200 (benchmarks/NOTES.md, section 10). This kernel reads each packed byte once, computes its block's scale in
registers (the 8-bit code's value times the scale of its group of 256 blocks, plus the offset) and writes both
values: one launch per weight, 14336 x 4096 in ~45 us (~3.2 TB/s) where bitsandbytes takes ~75. The per-block kernel,
the default where a weight is whole blocks, takes (blocks, bytes) tiles and computes each block's scale once instead
of once per byte: 40.6 us (~3.6 TB/s; NOTES.md section 29), the same values.

The result is bit-for-bit bitsandbytes' (tests/test_nf4_dequantize.py): the same table, the scale computed as
bitsandbytes computes it (a product rounded to float32, then the offset added: the kernel is compiled without
fused multiply-adds), each value the table entry times the scale, rounded once to the output dtype.

Layout (bitsandbytes' `quantize_4bit`; litft quantizes with blocksize 64): byte i holds values 2i (high nibble)
and 2i+1 (low nibble); block b = values 64b .. 64b+63 = bytes 32b .. 32b+31 has the scale absmax[b]; with double
quantization absmax[b] is an 8-bit code, its value nested_code[absmax[b]] * nested_absmax[b // nested_blocksize] +
offset.
"""

from __future__ import annotations

import functools

import torch

from litft.triton_support import kernels_run_on, launching_on

BYTES_PER_PROGRAM = 1024  # with 4 warps, the fastest of 15 sizes on an H200 (benchmarks/NOTES.md, section 10)
WARPS = 4
# The per-block kernel: a program's bytes as (blocks, bytes per block), each block's scale computed once (not once
# per byte), each thread reading 16 bytes at a time. False: the per-byte kernel above (the benchmarks' A/B).
PER_BLOCK = True
BLOCKS_PER_PROGRAM = 64
BLOCK_WARPS = 4


block_scale = None  # the kernels' jitted helper, a module global once built: Triton resolves calls through globals


def _helpers() -> None:
    """Builds the helper both kernels call, afresh with the kernels (their builder is cached): on first use, not at
    import, since Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) is chosen when a function is decorated."""
    import triton
    import triton.language as tl

    global block_scale

    def scale_of_block(block, inside, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                       NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BLOCKS_PER_WEIGHT: tl.constexpr):
        """The scale of each block in `block`: absmax, or with double quantization its 8-bit code's value times
        its group's scale plus the offset (a float32 product, then the sum: the kernels are compiled without fused
        multiply-adds, as bitsandbytes rounds it)."""
        if NESTED:
            code = tl.load(absmax_ptr + block, mask=inside, other=0).to(tl.int32)
            group_scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=inside, other=0.0)
            if BLOCKS_PER_WEIGHT > 0:  # several weights back to back, each with its own offset
                offset = tl.load(offset_ptr + block // BLOCKS_PER_WEIGHT, mask=inside, other=0.0)
            else:
                offset = tl.load(offset_ptr)
            scale = tl.load(nested_code_ptr + code) * group_scale + offset
        else:  # one return: Triton types every return of a function, also one a constant condition skips
            scale = tl.load(absmax_ptr + block, mask=inside, other=0.0)
        return scale

    block_scale = triton.jit(scale_of_block)


@functools.cache
def _kernels():
    """(the per-byte kernel, the per-block kernel)."""
    import triton
    import triton.language as tl

    _helpers()

    @triton.jit
    def dequantize_nf4(
        packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, table_ptr, out_ptr, byte_count,
        NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BYTES_PER_BLOCK: tl.constexpr,
        BYTES_PER_PROGRAM: tl.constexpr, BLOCKS_PER_WEIGHT: tl.constexpr,
    ):
        start = tl.program_id(0).to(tl.int64) * BYTES_PER_PROGRAM
        byte_index = start + tl.arange(0, BYTES_PER_PROGRAM)
        in_range = byte_index < byte_count
        packed = tl.load(packed_ptr + byte_index, mask=in_range, other=0).to(tl.int32)
        scale = block_scale(byte_index // BYTES_PER_BLOCK, in_range, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                            offset_ptr, NESTED, NESTED_BLOCKSIZE, BLOCKS_PER_WEIGHT)
        high = tl.load(table_ptr + (packed >> 4)) * scale  # value 2i
        low = tl.load(table_ptr + (packed & 15)) * scale  # value 2i + 1
        # (BYTES_PER_PROGRAM, 2) row-major is the values' order: 2i, 2i + 1, ...
        values = tl.reshape(tl.join(high, low), [2 * BYTES_PER_PROGRAM]).to(out_ptr.dtype.element_ty)
        out_index = 2 * start + tl.arange(0, 2 * BYTES_PER_PROGRAM)
        tl.store(out_ptr + out_index, values, mask=out_index < 2 * byte_count)

    @triton.jit
    def dequantize_nf4_blocks(
        packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, table_ptr, out_ptr, block_count,
        NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, BYTES_PER_BLOCK: tl.constexpr,
        BLOCKS_PER_PROGRAM: tl.constexpr, BLOCKS_PER_WEIGHT: tl.constexpr,
    ):
        block = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)  # (P,)
        block_inside = block < block_count
        scale = block_scale(block, block_inside, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, NESTED,
                            NESTED_BLOCKSIZE, BLOCKS_PER_WEIGHT)
        byte_index = block[:, None] * BYTES_PER_BLOCK + tl.arange(0, BYTES_PER_BLOCK)[None, :]  # (P, bytes)
        inside = block_inside[:, None]
        packed = tl.load(packed_ptr + byte_index, mask=inside, other=0).to(tl.int32)
        high = tl.load(table_ptr + (packed >> 4)) * scale[:, None]  # value 2i
        low = tl.load(table_ptr + (packed & 15)) * scale[:, None]  # value 2i + 1
        values = tl.reshape(tl.join(high, low), [BLOCKS_PER_PROGRAM, 2 * BYTES_PER_BLOCK]).to(out_ptr.dtype.element_ty)
        out_index = block[:, None] * (2 * BYTES_PER_BLOCK) + tl.arange(0, 2 * BYTES_PER_BLOCK)[None, :]
        tl.store(out_ptr + out_index, values, mask=inside)

    return dequantize_nf4, dequantize_nf4_blocks


@functools.cache
def _nf4_table(device: torch.device) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.get_4bit_type("nf4", device=device).float().contiguous()


def can_dequantize(weight: torch.Tensor, out_features: int, in_features: int) -> bool:
    """Whether this kernel takes the weight: a CUDA tensor (or Triton's interpreter, which runs on CPU), Triton
    importable, and an even number of values (every linear layer's weight; bitsandbytes pads an odd count)."""
    return kernels_run_on(weight) and (out_features * in_features) % 2 == 0


def dequantize_nf4(
    weight: torch.Tensor, state: list[torch.Tensor], out_features: int, in_features: int, blocksize: int,
    nested_blocksize: int, dtype: torch.dtype, out: torch.Tensor | None = None, weight_count: int = 1,
) -> torch.Tensor:
    """The weight (out_features, in_features) in `dtype` from its packed storage and state (`[absmax]`, or
    `[absmax codes, nested_absmax, nested_code, offset]` with double quantization); `blocksize` values share a
    scale. Written into `out` when given (contiguous, of that shape and dtype: rows of a group's joined weight).

    `weight_count` > 1: that many weights of this shape laid back to back (their packed bytes, block scales and
    group scales each in one tensor, each weight's groups whole; `offset` one per weight), dequantized in one
    launch into (weight_count * out_features, in_features): a mixture's experts."""
    import triton

    packed = weight.contiguous().view(torch.uint8).reshape(-1)
    weight_bytes = out_features * in_features // 2
    byte_count = weight_count * weight_bytes
    out_features *= weight_count
    if packed.numel() < byte_count:
        raise ValueError(f"a packed NF4 weight of {packed.numel()} bytes cannot hold {out_features} x {in_features}")
    if out is None:
        out = torch.empty((out_features, in_features), dtype=dtype, device=weight.device)
    elif out.numel() != out_features * in_features or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"NF4 output must be a contiguous {out_features} x {in_features} {dtype} tensor")
    nested = len(state) == 4
    absmax = state[0]
    nested_absmax, nested_code, offset = state[1:] if nested else (absmax, absmax, absmax)
    bytes_per_block = blocksize // 2
    if weight_count > 1 and weight_bytes % bytes_per_block:
        raise ValueError(f"weights laid back to back must be whole blocks of {blocksize} values each")
    constants = dict(
        NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize if nested else 1, BYTES_PER_BLOCK=bytes_per_block,
        BLOCKS_PER_WEIGHT=weight_bytes // bytes_per_block if weight_count > 1 else 0,
    )
    arguments = (packed, absmax, nested_absmax, nested_code, offset, _nf4_table(weight.device), out)
    with launching_on(weight):
        if PER_BLOCK and weight_bytes % bytes_per_block == 0 and bytes_per_block & (bytes_per_block - 1) == 0:
            block_count = byte_count // bytes_per_block
            _kernels()[1][(triton.cdiv(block_count, BLOCKS_PER_PROGRAM),)](
                *arguments, block_count, BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM, num_warps=BLOCK_WARPS,
                enable_fp_fusion=False, **constants,
            )
        else:
            _kernels()[0][(triton.cdiv(byte_count, BYTES_PER_PROGRAM),)](
                *arguments, byte_count, BYTES_PER_PROGRAM=BYTES_PER_PROGRAM, num_warps=WARPS, enable_fp_fusion=False,
                **constants,
            )
    return out
