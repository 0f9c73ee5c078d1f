"""Both gradients that one adapted projection's output gradient gives its adapter, from one read of that gradient.

The grouped LoRA operator's backward (`litft.adapters.lora_projections`) has, per projection, the output
gradient `grad` (M tokens x N features), the adapter's up-projection `update` = B (N x r) and the rank-sized
input it saved from the forward, `low` (M x r), and needs
    grad_low    = grad @ update        (M, r): on through A to the input and to A's gradient;
    grad_update = grad.t() @ low       (N, r): B's gradient.
Both are rank-deep, so memory-bound, and as two GEMMs each reads the whole of `grad`: on llama-8b's MLP
(M = 8192, N = 14336, bf16) that is 235 MB read twice per projection, against ~7.5 GFLOP between them. Here one
Triton kernel reads each block of `grad` once and multiplies it both ways.

Layout: a program owns a block of BLOCK_COLUMNS columns, loaded whole, and a range of rows that it walks BLOCK_ROWS
at a time. Across its rows it keeps grad_update's [BLOCK_COLUMNS, r] sum in registers, complete over those rows;
each row tile's grad_low [BLOCK_ROWS, r] is complete over the program's columns only. Both go out in float32 as
partial sums, grad_low's into (column groups, M, r) and grad_update's into (row groups, N, r), and a second small
kernel adds both over their groups in order (no atomics: the same sums every run) and rounds once to grad's dtype
(`summed_partials`). The partials are the price of reading `grad` once: with the defaults at M = 8192,
N = 14336, r = 16 on an H200 (132 multiprocessors) 28 column groups x 9 row groups launch 252 programs, and the
partials are 14.7 MB + 8.3 MB (6.25% + 3.5% of grad's 235 MB), written and read back once, so ~280 MB move where
the two GEMMs read 470 MB. Measured on an H200 (benchmarks/bench_kernels.py --only adapter_gradients, NOTES.md
section 17): 0.081 ms against the GEMMs' 0.117 at llama-8b's 14,336 columns, 0.034 against 0.043 at 4,096, no
faster at 1,024; so on GPUs only gradients of at least SMALLEST_KERNEL_COLUMNS columns take it (llama-8b's q, o,
gate, up, down).

The kernel runs on a GPU (bf16 or fp16) or in Triton's interpreter (also float32); elsewhere, and for
    - a rank above 64 (the column block's [BLOCK_COLUMNS, r] sum and B's block no longer fit the registers, and
      the grad_low partial, 4r / (BLOCK_COLUMNS * element size) of grad's bytes, would outweigh the read saved),
    - rows of `grad` that are not contiguous (a transposed view: the blocks are loaded along rows),
    - operands of different dtypes or devices, empty operands,
    - a GPU whose shared memory cannot hold the configuration (found on the first launch, then remembered),
it takes the two torch matmuls. A column slice of a wider gradient (the joined q/k/v gradient's blocks) is read
in place through its row stride; `update` and `low` may be strided views too.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from litft.triton_support import interpreting, kernels_run_on, launching_on, multiprocessor_count

# The best of the sweep at 14,336 columns (0.081 ms queued; 2 or 4 stages, 64-row steps, 1 program per
# multiprocessor: 0.087-0.099 ms). 512 columns keep grad_low's partial at 4r / 1024 of grad's bytes in bf16
# (6.25% at rank 16) with a [512, 16] float32 sum that 4 warps hold in 64 registers a thread;
# 32 rows a step make a 32 KiB bf16 tile, three in flight (96 KiB of shared memory), so two programs fit on a
# Hopper multiprocessor.
BLOCK_ROWS = 32
BLOCK_COLUMNS = 512
STAGES = 3
PROGRAMS_PER_MULTIPROCESSOR = 2
# More row groups: more programs in flight, but grad_update's partial grows with them (row groups x N x r floats):
# held to this share of grad's bytes. It binds on narrow gradients (N = 1024 with 512 columns is 2 column groups).
LARGEST_PARTIAL_SHARE = 1 / 8
# The column block's float32 sum, [BLOCK_COLUMNS, padded rank], is spread over enough warps that each thread holds
# at most this many of its floats (more warps for larger ranks, up to 16).
SUM_FLOATS_PER_THREAD = 64
LARGEST_RANK = 64
# Measured on an H200 at 8,192 tokens and rank 16 with the calls queued behind the GPU, as a step queues them
# (benchmarks/bench_kernels.py --only adapter_gradients, NOTES.md section 17): 0.081 ms against the two GEMMs' 0.117
# at 14,336 columns, 0.034 against 0.043 at 4,096 (also a block of the joined q/k/v gradient), 0.015-0.020 against
# 0.016 at 1,024: a wash there, so narrower gradients take the GEMMs on GPUs. (Timed from an idle GPU, the kernel
# showed a ~0.095 ms floor at every width: its host side, not its kernels; section 16 read that as the kernel's.)
SMALLEST_KERNEL_COLUMNS = 4096
SMALLEST_DOT = 16  # tl.dot's smallest dimension: smaller ranks are padded with zeros
SUM_BLOCK = 1024  # partial-sum elements per program of the kernel that adds the groups

sum_over_groups = None  # the summing kernel's jitted helper, a module global once built (see _kernels)

_does_not_fit: set[tuple] = set()  # (device, dtype, padded rank) whose launch ran out of shared memory


class Plan(NamedTuple):
    """How the kernel splits an (M, N) gradient: the grid is (row_groups, column_groups), and a row group spans
    rows_per_program rows (a multiple of the row block)."""

    row_groups: int
    column_groups: int
    rows_per_program: int

    @property
    def programs(self) -> int:
        return self.row_groups * self.column_groups


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def padded_rank(rank: int) -> int:
    """The rank as the kernel's blocks hold it: a power of two, at least tl.dot's smallest dimension."""
    return max(SMALLEST_DOT, 1 << (rank - 1).bit_length())


def plan(
    rows: int, columns: int, rank: int, element_size: int, multiprocessors: int, *,
    block_rows: int = BLOCK_ROWS, block_columns: int = BLOCK_COLUMNS,
    programs_per_multiprocessor: int = PROGRAMS_PER_MULTIPROCESSOR,
    largest_partial_share: float = LARGEST_PARTIAL_SHARE, row_groups: int | None = None,
) -> Plan:
    """The split of an (rows, columns) gradient: as many row groups as make about `programs_per_multiprocessor`
    programs per multiprocessor (not more: a second, partial wave would leave most of the GPU idle while it ran),
    fewer where grad_update's partial would pass `largest_partial_share` of the gradient's bytes; or `row_groups`,
    given. Each group takes an equal number of row blocks, the last the rest."""
    column_groups = _ceil_div(columns, block_columns)
    row_tiles = _ceil_div(rows, block_rows)
    if row_groups is None:
        within_share = int(largest_partial_share * rows * element_size / (4 * rank))
        row_groups = min(programs_per_multiprocessor * multiprocessors // column_groups, within_share)
    tiles_per_program = max(1, _ceil_div(row_tiles, max(1, min(row_groups, row_tiles))))
    return Plan(_ceil_div(row_tiles, tiles_per_program), column_groups, tiles_per_program * block_rows)


def default_warps(block_columns: int, rank: int) -> int:
    """Enough warps that each thread holds at most SUM_FLOATS_PER_THREAD floats of the column block's float32 sum
    (4 to 16: 4 at the defaults and rank 16, 16 at rank 64)."""
    return min(16, max(4, block_columns * padded_rank(rank) // (32 * SUM_FLOATS_PER_THREAD)))


def uses_kernel(grad: torch.Tensor, update: torch.Tensor, low: torch.Tensor) -> bool:
    """Whether `adapter_gradients` takes these operands through the kernel (see the module's docstring for what
    it leaves to torch)."""
    if not kernels_run_on(grad) or grad.dim() != 2 or grad.numel() == 0 or grad.stride(1) != 1:
        return False
    if not 1 <= update.shape[1] <= LARGEST_RANK or low.shape[0] == 0:
        return False
    if grad.is_cuda and grad.shape[1] < SMALLEST_KERNEL_COLUMNS:  # see SMALLEST_KERNEL_COLUMNS
        return False
    if any(tensor.dtype != grad.dtype or tensor.device != grad.device for tensor in (update, low)):
        return False
    # float32 only in the interpreter (the CPU tests); on a GPU its dot would run without tensor cores.
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if interpreting() else (torch.bfloat16, torch.float16)
    if grad.dtype not in dtypes:
        return False
    return (grad.device, grad.dtype, padded_rank(update.shape[1])) not in _does_not_fit


def adapter_gradients(
    grad: torch.Tensor, update: torch.Tensor, low: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad @ update, grad.t() @ low): grad_low (M, r) and grad_update (N, r) in grad's dtype, for grad (M, N),
    update (N, r) and low (M, r). Through the kernel where `uses_kernel`, summed in float32 and rounded once;
    else the two torch matmuls."""
    _check_shapes(grad, update, low)
    if uses_kernel(grad, update, low):
        try:
            return fused_adapter_gradients(grad, update, low)
        except Exception as error:  # noqa: BLE001 - re-raised unless the configuration does not fit this GPU
            if "OutOfResources" not in type(error).__name__ and "out of resource" not in str(error).lower():
                raise
            _does_not_fit.add((grad.device, grad.dtype, padded_rank(update.shape[1])))
    return grad @ update, grad.t() @ low


def _check_shapes(grad: torch.Tensor, update: torch.Tensor, low: torch.Tensor) -> None:
    if (grad.dim(), update.dim(), low.dim()) != (2, 2, 2) or update.shape[0] != grad.shape[1] \
            or low.shape[0] != grad.shape[0] or low.shape[1] != update.shape[1]:
        raise ValueError(f"adapter_gradients: grad {tuple(grad.shape)}, update {tuple(update.shape)} and low "
                         f"{tuple(low.shape)} are not (M, N), (N, r) and (M, r)")


def fused_adapter_gradients(
    grad: torch.Tensor, update: torch.Tensor, low: torch.Tensor, *,
    block_rows: int = BLOCK_ROWS, block_columns: int = BLOCK_COLUMNS, warps: int | None = None,
    stages: int = STAGES, programs_per_multiprocessor: int = PROGRAMS_PER_MULTIPROCESSOR,
    largest_partial_share: float = LARGEST_PARTIAL_SHARE, row_groups: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`adapter_gradients` through the kernel, unconditionally, with its configuration open (the benchmark's
    sweep, the tests' small blocks): blocks of `block_rows` x `block_columns` (powers of two, at least 16),
    `warps` (by default enough that each thread holds SUM_FLOATS_PER_THREAD floats of the column block's sum),
    `stages` tiles in flight, and the row groups `plan` makes of the rest."""
    _check_shapes(grad, update, low)
    for name, block in (("block_rows", block_rows), ("block_columns", block_columns)):
        if block < SMALLEST_DOT or block & (block - 1):
            raise ValueError(f"{name}={block}: a power of two, at least {SMALLEST_DOT}")
    if grad.stride(1) != 1:
        raise ValueError("fused_adapter_gradients: grad's rows must be contiguous (unit column stride)")
    rows, columns = grad.shape
    rank = update.shape[1]
    rank_block = padded_rank(rank)
    split = plan(rows, columns, rank, grad.element_size(), multiprocessor_count(grad.device),
                 block_rows=block_rows, block_columns=block_columns,
                 programs_per_multiprocessor=programs_per_multiprocessor,
                 largest_partial_share=largest_partial_share, row_groups=row_groups)
    if warps is None:
        warps = default_warps(block_columns, rank)
    low_partials = torch.empty(split.column_groups, rows, rank, dtype=torch.float32, device=grad.device)
    update_partials = torch.empty(split.row_groups, columns, rank, dtype=torch.float32, device=grad.device)
    with launching_on(grad):
        _kernels()[0][(split.row_groups, split.column_groups)](
            grad, grad.stride(0), update, update.stride(0), update.stride(1), low, low.stride(0), low.stride(1),
            low_partials, update_partials, rows, columns, rank, split.rows_per_program,
            BLOCK_ROWS=block_rows, BLOCK_COLUMNS=block_columns, RANK_BLOCK=rank_block,
            # Triton's interpreter multiplies bf16 blocks as their raw 16-bit integers (triton 3.9): there the
            # operands are widened first, exactly, and multiplied in full float32 ("ieee", not tf32), as float32
            # operands are everywhere.
            DOT_IN_FLOAT32=grad.dtype == torch.float32 or interpreting(),
            num_warps=warps, num_stages=stages,
        )
    grad_low, grad_update = summed_partials([low_partials, update_partials], grad.dtype)
    return grad_low, grad_update


def summed_partials(partials: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Each float32 (groups, ...) partial summed over its groups in order and rounded once to `dtype`. On a GPU (or
    the interpreter) all of them in one launch: the sums of one projection's kernel are four small torch kernels
    otherwise (two sums, two casts), ~3 us each plus their gaps, about what the kernel saves on a 1,024-column
    gradient. The same bits every run either way."""
    if not all(kernels_run_on(partial) for partial in partials) or len(partials) > 2 \
            or any(partial.numel() == 0 or not partial.is_contiguous() for partial in partials):
        return [partial.sum(0).to(dtype) for partial in partials]
    # Triton 3.9's interpreter truncates float32 to bf16 where a GPU rounds to nearest even: there the kernel writes
    # float32 and torch rounds, so the CPU tests see the GPU's numbers.
    written = torch.float32 if interpreting() else dtype
    outputs = [torch.empty(partial.shape[1:], dtype=written, device=partial.device) for partial in partials]
    first, second = partials[0], partials[-1]  # one partial: its programs only (second_programs below is 0)
    first_size, second_size = first[0].numel(), second[0].numel()
    first_programs = _ceil_div(first_size, SUM_BLOCK)
    second_programs = _ceil_div(second_size, SUM_BLOCK) if len(partials) == 2 else 0
    with launching_on(first):
        _kernels()[1][(first_programs + second_programs,)](
            first, outputs[0], first.shape[0], first_size, second, outputs[-1], second.shape[0], second_size,
            first_programs, BLOCK=SUM_BLOCK,
        )
    return [output.to(dtype) for output in outputs]


@functools.cache
def _kernels():
    # Built on first use: Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) is chosen when a function is
    # decorated. No tl.zeros or tl.cdiv: triton.language's own jitted helpers are built when triton is imported
    # and are not interpreted in a process that chose the interpreter later.
    import triton
    import triton.language as tl

    @triton.jit
    def adapter_gradients_kernel(
        grad_ptr, grad_row_stride, update_ptr, update_row_stride, update_column_stride,
        low_ptr, low_row_stride, low_column_stride, low_partials_ptr, update_partials_ptr,
        rows, columns, rank, rows_per_program,
        BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr, RANK_BLOCK: tl.constexpr,
        DOT_IN_FLOAT32: tl.constexpr,
    ):
        row_group = tl.program_id(0)
        column_group = tl.program_id(1)
        first_row = row_group * rows_per_program
        last_row = tl.minimum(first_row + rows_per_program, rows)
        column_index = column_group * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
        column_inside = column_index < columns
        tile_rows = tl.arange(0, BLOCK_ROWS)
        rank_index = tl.arange(0, RANK_BLOCK)
        rank_inside = rank_index < rank
        # B's rows for these columns, read once and held across the row tiles; zeros past the rank, so the padded
        # columns of both products are zero and never stored.
        update_offset = column_index[:, None].to(tl.int64) * update_row_stride \
            + rank_index[None, :] * update_column_stride
        update = tl.load(update_ptr + update_offset, mask=column_inside[:, None] & rank_inside[None, :], other=0.0)
        if DOT_IN_FLOAT32:
            update = update.to(tl.float32)
        update_sum = tl.full([BLOCK_COLUMNS, RANK_BLOCK], 0.0, tl.float32)
        # 64-bit bases (M x N passes 2**31 on long batches of wide layers); offsets within a tile stay 32-bit, and
        # the pointers advance a tile at a time.
        start = first_row.to(tl.int64)
        grad_tile_ptr = grad_ptr + start * grad_row_stride \
            + (tile_rows[:, None] * grad_row_stride + column_index[None, :])
        low_tile_ptr = low_ptr + start * low_row_stride + (tile_rows[:, None] * low_row_stride
                                                           + rank_index[None, :] * low_column_stride)
        low_partial_ptr = low_partials_ptr + (column_group.to(tl.int64) * rows + start) * rank \
            + (tile_rows[:, None] * rank + rank_index[None, :])
        for row in tl.range(first_row, last_row, BLOCK_ROWS):
            row_inside = row + tile_rows < rows
            grad_tile = tl.load(grad_tile_ptr, mask=row_inside[:, None] & column_inside[None, :], other=0.0)
            low_tile = tl.load(low_tile_ptr, mask=row_inside[:, None] & rank_inside[None, :], other=0.0)
            if DOT_IN_FLOAT32:
                grad_tile = grad_tile.to(tl.float32)
                low_tile = low_tile.to(tl.float32)
                low_partial = tl.dot(grad_tile, update, input_precision="ieee")
                update_sum = tl.dot(tl.trans(grad_tile), low_tile, update_sum, input_precision="ieee")
            else:
                low_partial = tl.dot(grad_tile, update)
                update_sum = tl.dot(tl.trans(grad_tile), low_tile, update_sum)
            # This row tile's grad_low over this program's columns; the other column groups add theirs in torch.
            tl.store(low_partial_ptr, low_partial, mask=row_inside[:, None] & rank_inside[None, :])
            grad_tile_ptr += BLOCK_ROWS * grad_row_stride
            low_tile_ptr += BLOCK_ROWS * low_row_stride
            low_partial_ptr += BLOCK_ROWS * rank
        update_partial_ptr = update_partials_ptr + row_group.to(tl.int64) * columns * rank \
            + (column_index[:, None] * rank + rank_index[None, :])
        tl.store(update_partial_ptr, update_sum, mask=column_inside[:, None] & rank_inside[None, :])

    global sum_over_groups

    def sum_groups(partials_ptr, out_ptr, groups, size, program, BLOCK: tl.constexpr):
        index = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = index < size
        total = tl.load(partials_ptr + index, mask=inside, other=0.0)
        for group in tl.range(1, groups):
            total += tl.load(partials_ptr + group * size + index, mask=inside, other=0.0)
        tl.store(out_ptr + index, total.to(out_ptr.dtype.element_ty), mask=inside)

    sum_over_groups = triton.jit(sum_groups)

    @triton.jit
    def partial_sums_kernel(first_ptr, first_out_ptr, first_groups, first_size,
                            second_ptr, second_out_ptr, second_groups, second_size, first_programs,
                            BLOCK: tl.constexpr):
        program = tl.program_id(0)
        if program < first_programs:
            sum_over_groups(first_ptr, first_out_ptr, first_groups, first_size, program, BLOCK)
        else:
            sum_over_groups(second_ptr, second_out_ptr, second_groups, second_size, program - first_programs, BLOCK)

    return adapter_gradients_kernel, partial_sums_kernel
