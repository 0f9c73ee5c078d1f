"""The LoRA GEMMs of `litft.adapters.lora_gemm` as warp-specialized kernels (Hopper): one warp loads, two warp groups
multiply, taking turns.

`lora_gemm`'s persistent Triton kernel runs each tile's epilogue (rounding, the stores, the gated product) while the
tensor cores wait, which costs most where the reduction is short: at llama-8b's 4,096-deep calls (q/k/v's forward,
gate and up with h, down's and o's input gradients, ~40% of a LoRA step) it and cuBLAS run 2-7% below their rate
on the 14,336-deep ones (benchmarks/NOTES.md, sections 20-21). Here, written in Gluon (Triton's layer for explicit
layouts, shared memory and warp roles), each program is
    a loading warp   that walks this program's tiles and issues the TMA copies of every block of A and B they need
                     into a ring of shared-memory stages;
    two warp groups  that take alternate tiles: each waits for its tile's stages, multiplies them (wgmma) into a
                     float32 accumulator in its registers, releases each stage as the multiply reading it retires,
                     then rounds and stores its tile (through shared memory and TMA) while the other group, whose
                     stages the loading warp has been filling meanwhile, keeps the tensor cores busy.
The groups take turns explicitly (a pair of barriers): a group starts waiting for its tile's stages only once the other
has waited for all of its own, since a stage's barrier tells apart only its current filling and the one before.

Same sums as `lora_gemm` (C = sum_j A_j @ B_j or B_j^T, up to three long pairs and a rank-deep one; or gate, up and
h = act(gate) * up from one joined GEMM), same operands and one rounding of the whole sum. The rank-deep pair takes
one ring stage, its blocks laid into the stage's buffers at their own (narrower) width.

A third epilogue (`gated_input_gradient`) is a gated MLP's backward through its down projection: the tile of
d h = dy @ W + g_low @ (sA) is not stored; the group reads it back from its staging buffer with gate's and up's
tiles, stores d gate and d up, writes h = act(gate) * up over it and multiplies h^T by the tile's rows of g_low
(one small wgmma) into a per-row-tile partial of the down adapter's A gradient. That is an elementwise kernel's
work (NOTES.md, section 29), done while the other group multiplies; in the persistent Triton kernel, whose epilogue
stalls the tensor cores, it had cost more than it saved (section 19).

Measured on an H200 (NOTES.md, section 28): 2-5% faster than the Triton kernel on llama-8b's wide 4,096-deep calls
alone, 1-6% slower on the deep ones (a 128 x 128 tile reads B from L2 twice as often as a 128 x 256 one); a LoRA
llama-1b step 1.4% faster at 7% less energy, a llama-8b step, bound by the GPU's power, level. `lora_gemm` times it
as a candidate for reductions up to `lora_gemm.WARP_SPECIALIZED_DEEPEST`. `benchmarks/compile_pingpong.py` compiles
it for sm_90 on a machine without a GPU (registers, shared memory, PTX).
"""

from __future__ import annotations

import functools

import torch

from litft.adapters import lora_gemm

BLOCK_M = 128  # one warp group's tile: 128 x 128 float32 is 128 registers per thread
BLOCK_N = 128
BLOCK_K = 64
# The rank-deep pair's block widths (a power of two, at least the MMA's 16), up to lora_gemm.LOW_RANK_BLOCK.
RANK_BLOCKS = (16, 32, 64)
CONSUMER_REGISTERS = 232
LOADER_REGISTERS = 40
SHARED_MEMORY = 227 * 1024  # an H100 / H200 block's most


def _layout(block: list[int], dtype: torch.dtype):
    from triton.experimental.gluon import language as gl

    gl_dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]
    return gl.NVMMASharedLayout.get_default_for(block, gl_dtype)


# Gluon's names and the kernels' jitted helpers, module globals once built: Triton resolves the names a kernel uses
# through its module's globals, not through closures.
gl = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = None
activation = tile_origin = load_blocks = loader = b_operand = consumer = activation_backward = None


@functools.cache
def _kernel():
    global gl, fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    global activation, tile_origin, load_blocks, loader, b_operand, consumer, activation_backward
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from litft.adapters import gated_activation

    activation = gated_activation.jitted_activation("gluon")

    @gluon.jit
    def tile_origin(tile, rows, COLUMNS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    GROUP_M: gl.constexpr):
        row_tiles = (rows + BLOCK_M - 1) // BLOCK_M
        column_tiles: gl.constexpr = (COLUMNS + BLOCK_N - 1) // BLOCK_N
        tiles_per_group = GROUP_M * column_tiles
        first_row_tile = (tile // tiles_per_group) * GROUP_M
        group_rows = gl.minimum(row_tiles - first_row_tile, GROUP_M)
        row = (first_row_tile + (tile % tiles_per_group) % group_rows) * BLOCK_M
        column = ((tile % tiles_per_group) // group_rows) * BLOCK_N
        return row, column

    @gluon.jit
    def load_blocks(a, b, a_ring, b_ring, ready, free, row, column, block, DEPTH: gl.constexpr,
                    STAGE_BYTES: gl.constexpr, TRANSPOSED: gl.constexpr, GATED: gl.constexpr,
                    STAGES: gl.constexpr):
        BLOCK_K: gl.constexpr = a.block_type.shape[1]
        for k in range(0, DEPTH, BLOCK_K):
            stage = block % STAGES
            # A stage is free once the multiply that read it last retired (the first pass finds all free).
            mbarrier.wait(free.index(stage), ((block // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(stage), STAGE_BYTES)
            tma.async_copy_global_to_shared(a, [row, k], ready.index(stage), a_ring.index(stage))
            if GATED:
                tma.async_copy_global_to_shared(b, [0, column, k], ready.index(stage), b_ring.index(stage))
            elif TRANSPOSED:
                tma.async_copy_global_to_shared(b, [column, k], ready.index(stage), b_ring.index(stage))
            else:
                tma.async_copy_global_to_shared(b, [k, column], ready.index(stage), b_ring.index(stage))
            block += 1
        return block

    @gluon.jit
    def loader(rows, a0, b0, a1, b1, a2, b2, low_a, low_b, a_ring, b_ring, ready, free,
               COLUMNS: gl.constexpr, DEPTH0: gl.constexpr, DEPTH1: gl.constexpr, DEPTH2: gl.constexpr,
               LOW_K: gl.constexpr, STEP_N: gl.constexpr, TRANSPOSED: gl.constexpr, GATED: gl.constexpr,
               GROUP_M: gl.constexpr, PROGRAMS: gl.constexpr, STAGES: gl.constexpr,
               STAGE_BYTES: gl.constexpr, LOW_BYTES: gl.constexpr):
        BLOCK_M: gl.constexpr = a0.block_type.shape[0]
        tiles = ((rows + BLOCK_M - 1) // BLOCK_M) * ((COLUMNS + STEP_N - 1) // STEP_N)
        block = 0
        for tile in range(gl.program_id(0), tiles, PROGRAMS):
            row, column = tile_origin(tile, rows, COLUMNS, BLOCK_M, STEP_N, GROUP_M)
            if LOW_K > 0:
                # The rank-deep pair first, into the stage's buffers at its own width.
                stage = block % STAGES
                mbarrier.wait(free.index(stage), ((block // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(stage), LOW_BYTES)
                low_a_view = a_ring.index(stage)._reinterpret(a0.dtype, low_a.block_type.shape, low_a.layout)
                tma.async_copy_global_to_shared(low_a, [row, 0], ready.index(stage), low_a_view)
                low_b_view = b_ring.index(stage)._reinterpret(a0.dtype, low_b.block_type.shape, low_b.layout)
                if GATED:
                    tma.async_copy_global_to_shared(low_b, [0, column, 0], ready.index(stage), low_b_view)
                elif TRANSPOSED:
                    tma.async_copy_global_to_shared(low_b, [column, 0], ready.index(stage), low_b_view)
                else:
                    tma.async_copy_global_to_shared(low_b, [0, column], ready.index(stage), low_b_view)
                block += 1
            block = load_blocks(a0, b0, a_ring, b_ring, ready, free, row, column, block, DEPTH0, STAGE_BYTES,
                                TRANSPOSED, GATED, STAGES)
            if DEPTH1 > 0:
                block = load_blocks(a1, b1, a_ring, b_ring, ready, free, row, column, block, DEPTH1, STAGE_BYTES,
                                    TRANSPOSED, GATED, STAGES)
            if DEPTH2 > 0:
                block = load_blocks(a2, b2, a_ring, b_ring, ready, free, row, column, block, DEPTH2, STAGE_BYTES,
                                    TRANSPOSED, GATED, STAGES)

    @gluon.jit
    def b_operand(view, TRANSPOSED: gl.constexpr, GATED: gl.constexpr):
        if GATED:  # [2, N/2, K] -> (K, N): gate's columns then up's
            return view.reshape([view.shape[0] * view.shape[1], view.shape[2]]).permute((1, 0))
        elif TRANSPOSED:  # (N, K) -> (K, N)
            return view.permute((1, 0))
        else:
            return view

    @gluon.jit
    def activation_backward(staging, low_staging, row, column, rows, gate, up, grad_low, grad_gate, grad_up,
                            partials, gate_stride, up_stride, COLUMNS: gl.constexpr, RANK: gl.constexpr,
                            GELU: gl.constexpr):
        # staging holds this tile of d h, rounded. Per 32 columns: d gate and d up from it and gate's and up's
        # tiles, and h, written over d h's columns (each thread writes the elements it read).
        BLOCK_M: gl.constexpr = staging.shape[0]
        TILE_N: gl.constexpr = staging.shape[1]
        CHUNK: gl.constexpr = 32
        chunk_layout: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
        # 64-bit offsets only to the tile's corner: within it 32-bit ones, fewer registers.
        corner = row.to(gl.int64)
        gate_tile = gate + corner * gate_stride + column
        up_tile = up + corner * up_stride + column
        grad_gate_tile = grad_gate + corner * COLUMNS + column
        grad_up_tile = grad_up + corner * COLUMNS + column
        tile_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, chunk_layout))
        row_inside = (row + tile_rows) < rows
        for part in gl.static_range(TILE_N // CHUNK):
            tile_columns = part * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(0, chunk_layout))
            inside = row_inside[:, None] & (column + tile_columns < COLUMNS)[None, :]
            chunk = staging.slice(part * CHUNK, CHUNK, dim=1)
            grad_product = chunk.load(chunk_layout).to(gl.float32)
            gate_value = gl.load(gate_tile + tile_rows[:, None] * gate_stride + tile_columns[None, :], mask=inside,
                                 other=0.0).to(gl.float32)
            up_value = gl.load(up_tile + tile_rows[:, None] * up_stride + tile_columns[None, :], mask=inside,
                               other=0.0).to(gl.float32)
            value, slope = activation(gate_value, GELU)
            offsets = tile_rows[:, None] * COLUMNS + tile_columns[None, :]
            gl.store(grad_gate_tile + offsets, (grad_product * up_value * slope).to(grad_gate.dtype.element_ty),
                     mask=inside)
            gl.store(grad_up_tile + offsets, (grad_product * value).to(grad_up.dtype.element_ty), mask=inside)
            # h as the forward rounded it; zero in rows and columns past the edges (gate = up = 0 there).
            chunk.store((value * up_value).to(staging.dtype))
        # This tile's share of the adapter's A gradient, h^T @ g_low (TILE_N, rank), into its row tile's partial.
        RANK_BLOCK: gl.constexpr = low_staging.shape[1]
        low_layout: gl.constexpr = gl.BlockedLayout([1, 8], [256 // RANK_BLOCK, RANK_BLOCK // 8], [4, 1], [1, 0])
        low_rows = row + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, low_layout))
        ranks = gl.arange(0, RANK_BLOCK, layout=gl.SliceLayout(0, low_layout))
        low_tile = gl.load(grad_low + low_rows.to(gl.int64)[:, None] * RANK + ranks[None, :],
                           mask=(low_rows < rows)[:, None] & (ranks < RANK)[None, :], other=0.0)
        low_staging.store(low_tile)
        fence_async_shared()
        partial_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                                 instr_shape=[16, RANK_BLOCK, 16])
        partial = warpgroup_mma(staging.permute((1, 0)), low_staging,
                                gl.zeros([TILE_N, RANK_BLOCK], gl.float32, partial_layout), use_acc=False,
                                is_async=True)
        partial = warpgroup_mma_wait(num_outstanding=0, deps=(partial,))
        columns = column + gl.arange(0, TILE_N, layout=gl.SliceLayout(1, partial_layout))
        partial_ranks = gl.arange(0, RANK_BLOCK, layout=gl.SliceLayout(0, partial_layout))
        # partials is (row tiles, rank, columns), float32
        pointers = partials + ((row // BLOCK_M) * RANK + partial_ranks[None, :]).to(gl.int64) * COLUMNS \
            + columns[:, None]
        gl.store(pointers, partial, mask=(partial_ranks < RANK)[None, :] & (columns < COLUMNS)[:, None])

    @gluon.jit
    def consumer(rows, c, gate_out, up_out, product_out, low_a, low_b, a_ring, b_ring, ready, free, turns, staging,
                 product_staging, gate, up, grad_low, grad_gate, grad_up, partials, gate_stride, up_stride,
                 FIRST: gl.constexpr, COLUMNS: gl.constexpr, BLOCKS: gl.constexpr,
                 MAIN_BLOCKS: gl.constexpr, LOW_K: gl.constexpr, STEP_N: gl.constexpr, TRANSPOSED: gl.constexpr,
                 GATED: gl.constexpr, GELU: gl.constexpr, GROUP_M: gl.constexpr, PROGRAMS: gl.constexpr,
                 STAGES: gl.constexpr, BACKWARD: gl.constexpr, RANK: gl.constexpr):
        BLOCK_M: gl.constexpr = staging.shape[0]
        TILE_N: gl.constexpr = staging.shape[1]
        accumulator: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                              instr_shape=[16, TILE_N, 16])
        tiles = ((rows + BLOCK_M - 1) // BLOCK_M) * ((COLUMNS + STEP_N - 1) // STEP_N)
        local = FIRST  # this program's tile count: the group takes every other one
        for tile in range(gl.program_id(0) + FIRST * PROGRAMS, tiles, 2 * PROGRAMS):
            row, column = tile_origin(tile, rows, COLUMNS, BLOCK_M, STEP_N, GROUP_M)
            block = local * BLOCKS  # the tile's first stage in the loader's order
            # This group's turn: the other group has waited for all the stages of its tile (see the docstring).
            mbarrier.wait(turns.index(FIRST), ((local // 2) & 1) ^ (1 - FIRST))
            acc = gl.zeros([BLOCK_M, TILE_N], gl.float32, accumulator)
            use_acc = False
            previous = 0
            if LOW_K > 0:
                stage = block % STAGES
                mbarrier.wait(ready.index(stage), (block // STAGES) & 1)
                low_a_view = a_ring.index(stage)._reinterpret(low_a.dtype, low_a.block_type.shape, low_a.layout)
                low_b_view = b_ring.index(stage)._reinterpret(low_a.dtype, low_b.block_type.shape, low_b.layout)
                acc = warpgroup_mma(low_a_view, b_operand(low_b_view, TRANSPOSED, GATED), acc, use_acc=False,
                                    is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))  # left in flight
                use_acc = True
                block += 1
                previous = stage
            for step in range(MAIN_BLOCKS):
                stage = block % STAGES
                mbarrier.wait(ready.index(stage), (block // STAGES) & 1)
                acc = warpgroup_mma(a_ring.index(stage), b_operand(b_ring.index(stage), TRANSPOSED, GATED), acc,
                                    use_acc=use_acc, is_async=True)
                use_acc = True
                # The multiply before this one has retired: its stage goes back to the loader.
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                if LOW_K > 0 or step > 0:
                    mbarrier.arrive(free.index(previous), count=1)
                previous = stage
                block += 1
            mbarrier.arrive(turns.index(1 - FIRST), count=1)  # the other group's turn
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(free.index(previous), count=1)
            # The epilogue: this group's previous stores must have left its staging buffers.
            tma.store_wait(0)
            staging.store(acc.to(staging.dtype))
            fence_async_shared()
            if GATED:
                gate_tile = staging.slice(0, STEP_N, dim=1)
                up_tile = staging.slice(STEP_N, STEP_N, dim=1)
                tma.async_copy_shared_to_global(gate_out, [row, column], gate_tile)
                tma.async_copy_shared_to_global(up_out, [row, column], up_tile)
                # h from gate and up as stored (rounded), as the elementwise kernel would read them back.
                rows_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
                gate_value = gate_tile.load(rows_layout).to(gl.float32)
                up_value = up_tile.load(rows_layout).to(gl.float32)
                value, _ = activation(gate_value, GELU)
                product_staging.store((value * up_value).to(product_staging.dtype))
                fence_async_shared()
                tma.async_copy_shared_to_global(product_out, [row, column], product_staging)
            elif BACKWARD:
                activation_backward(staging, product_staging, row, column, rows, gate, up, grad_low, grad_gate,
                                    grad_up, partials, gate_stride, up_stride, COLUMNS, RANK, GELU)
            else:
                tma.async_copy_shared_to_global(c, [row, column], staging)
            local += 2
        tma.store_wait(0)

    @gluon.jit
    def pingpong_kernel(
        c, gate_out, up_out, product_out, rows, a0, b0, a1, b1, a2, b2, low_a, low_b,
        gate, up, grad_low, grad_gate, grad_up, partials, gate_stride, up_stride,
        COLUMNS: gl.constexpr, DEPTH0: gl.constexpr, DEPTH1: gl.constexpr, DEPTH2: gl.constexpr,
        LOW_K: gl.constexpr, TILE_N: gl.constexpr, STEP_N: gl.constexpr, BLOCKS: gl.constexpr,
        MAIN_BLOCKS: gl.constexpr, STAGE_BYTES: gl.constexpr, LOW_BYTES: gl.constexpr,
        TRANSPOSED: gl.constexpr, GATED: gl.constexpr, GELU: gl.constexpr, GROUP_M: gl.constexpr,
        PROGRAMS: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGISTERS: gl.constexpr,
        LOADER_REGISTERS: gl.constexpr, BACKWARD: gl.constexpr, RANK: gl.constexpr, RANK_BLOCK: gl.constexpr,
    ):
        BLOCK_M: gl.constexpr = a0.block_type.shape[0]
        dtype: gl.constexpr = a0.dtype
        a_ring = gl.allocate_shared_memory(dtype, [STAGES] + a0.block_type.shape, a0.layout)
        b_ring = gl.allocate_shared_memory(dtype, [STAGES] + b0.block_type.shape, b0.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for stage in gl.static_range(STAGES):
            mbarrier.init(ready.index(stage), count=1)
            mbarrier.init(free.index(stage), count=1)
        mbarrier.init(turns.index(0), count=1)
        mbarrier.init(turns.index(1), count=1)
        fence_async_shared()
        staging_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        staging0 = gl.allocate_shared_memory(dtype, [BLOCK_M, TILE_N], staging_layout)
        staging1 = gl.allocate_shared_memory(dtype, [BLOCK_M, TILE_N], staging_layout)
        if GATED:
            product_staging0 = gl.allocate_shared_memory(dtype, product_out.block_type.shape, product_out.layout)
            product_staging1 = gl.allocate_shared_memory(dtype, product_out.block_type.shape, product_out.layout)
        elif BACKWARD:  # each group's rows of g_low, the B operand of h^T @ g_low
            low_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, RANK_BLOCK], dtype)
            product_staging0 = gl.allocate_shared_memory(dtype, [BLOCK_M, RANK_BLOCK], low_layout)
            product_staging1 = gl.allocate_shared_memory(dtype, [BLOCK_M, RANK_BLOCK], low_layout)
        else:
            product_staging0 = staging0
            product_staging1 = staging1
        # The default partition (this kernel's 4 warps) is the first group; the workers are the second group and
        # the loading warp, each with its share of the register file.
        gl.warp_specialize(
            [
                (consumer, (rows, c, gate_out, up_out, product_out, low_a, low_b, a_ring, b_ring, ready, free, turns,
                            staging0, product_staging0, gate, up, grad_low, grad_gate, grad_up, partials,
                            gate_stride, up_stride, 0, COLUMNS, BLOCKS, MAIN_BLOCKS, LOW_K, STEP_N, TRANSPOSED,
                            GATED, GELU, GROUP_M, PROGRAMS, STAGES, BACKWARD, RANK)),
                (consumer, (rows, c, gate_out, up_out, product_out, low_a, low_b, a_ring, b_ring, ready, free, turns,
                            staging1, product_staging1, gate, up, grad_low, grad_gate, grad_up, partials,
                            gate_stride, up_stride, 1, COLUMNS, BLOCKS, MAIN_BLOCKS, LOW_K, STEP_N, TRANSPOSED,
                            GATED, GELU, GROUP_M, PROGRAMS, STAGES, BACKWARD, RANK)),
                (loader, (rows, a0, b0, a1, b1, a2, b2, low_a, low_b, a_ring, b_ring, ready, free, COLUMNS, DEPTH0,
                          DEPTH1, DEPTH2, LOW_K, STEP_N, TRANSPOSED, GATED, GROUP_M, PROGRAMS, STAGES, STAGE_BYTES,
                          LOW_BYTES)),
            ],
            [4, 1],
            [CONSUMER_REGISTERS, LOADER_REGISTERS],
        )

    return pingpong_kernel


# Gluon is experimental and its API moves between Triton releases: the versions these kernels were written and
# tested against (Triton 3.6, which torch 2.11 ships).
GLUON_VERSIONS = ("3.6.",)


@functools.cache
def _gluon_importable() -> bool:
    try:
        import triton
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma  # noqa: F401
    except ImportError:
        return False
    return triton.__version__.startswith(GLUON_VERSIONS)


def available(device: torch.device) -> bool:
    """Whether the kernels can run on `device`: a Hopper GPU (sm_90: wgmma and its register reallocation) and a
    Triton whose Gluon these kernels were written for."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return False
    return _gluon_importable()


def _descriptor(tensor: torch.Tensor, block: list[int]):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    return TensorDescriptor.from_tensor(tensor, block, _layout(block, tensor.dtype))


def rank_block(rank: int) -> int | None:
    """The rank-deep pair's block width for `rank` columns, None past the widest (the caller's other paths)."""
    return next((block for block in RANK_BLOCKS if rank <= block), None)


def _stages(epilogue_bytes: int) -> int:
    stage_bytes = (BLOCK_M + BLOCK_N) * BLOCK_K * 2
    return (SHARED_MEMORY - epilogue_bytes - 1024) // stage_bytes  # 1 KB for the barriers and the compiler's own


def launch_arguments(rows: int, columns: int, depths: list[int], low_k: int, transposed: bool, gated: bool,
                     programs: int, backward_rank: int = 0) -> dict:
    """The kernel's compile-time constants for a call (`benchmarks/compile_pingpong.py` builds them too);
    `backward_rank` > 0: the activation's backward in the epilogue (`gated_input_gradient`), for an adapter of that
    rank."""
    step_n = BLOCK_N // 2 if gated else BLOCK_N
    main_blocks = sum(-(-depth // BLOCK_K) for depth in depths)
    epilogue_bytes = 2 * BLOCK_M * BLOCK_N * 2 + (2 * BLOCK_M * step_n * 2 if gated else 0)
    if backward_rank:
        epilogue_bytes += 2 * BLOCK_M * rank_block(backward_rank) * 2
    padded = depths + [0] * (3 - len(depths))
    return dict(
        COLUMNS=columns, DEPTH0=padded[0], DEPTH1=padded[1], DEPTH2=padded[2], LOW_K=low_k, TILE_N=BLOCK_N,
        STEP_N=step_n, BLOCKS=main_blocks + (low_k > 0), MAIN_BLOCKS=main_blocks,
        STAGE_BYTES=(BLOCK_M + BLOCK_N) * BLOCK_K * 2, LOW_BYTES=(BLOCK_M + BLOCK_N) * low_k * 2,
        TRANSPOSED=transposed, GATED=gated, GELU=False, GROUP_M=lora_gemm.GROUP_ROWS, PROGRAMS=programs,
        STAGES=_stages(epilogue_bytes), CONSUMER_REGISTERS=CONSUMER_REGISTERS, LOADER_REGISTERS=LOADER_REGISTERS,
        BACKWARD=backward_rank > 0, RANK=backward_rank, RANK_BLOCK=rank_block(backward_rank) if backward_rank else 16,
    )


def _programs(device: torch.device, tiles: int) -> int:
    from litft.triton_support import multiprocessor_count

    return max(1, min(multiprocessor_count(device), tiles))


# The backward epilogue's arguments where it does not run (never read: BACKWARD is False).
_NO_BACKWARD = (None,) * 6 + (0, 0)


def sum_of_products(pairs, transposed: bool) -> torch.Tensor:
    """C = sum_j A_j @ B_j (B_j stored (K, N)) or A_j @ B_j^T (`transposed`, B_j stored (N, K)), bf16 / fp16 in and
    out, one float32 accumulator: up to three long pairs and, last, a rank-deep one (K <= 64). The caller checks
    `available` and the operands' alignment (`lora_gemm.can_fuse`)."""
    from litft.triton_support import launching_on

    a0, b0 = pairs[0]
    rows = a0.shape[0]
    columns = b0.shape[0] if transposed else b0.shape[1]
    looped, low = lora_gemm.rank_deep_split(pairs)
    if len(looped) > lora_gemm.LOOPED_PAIRS:
        raise ValueError(f"at most {lora_gemm.LOOPED_PAIRS} pairs besides a rank-deep one")
    out = torch.empty((rows, columns), dtype=a0.dtype, device=a0.device)
    b_block = [BLOCK_N, BLOCK_K] if transposed else [BLOCK_K, BLOCK_N]
    descriptors = []
    for a, b in looped:
        descriptors += [_descriptor(a, [BLOCK_M, BLOCK_K]), _descriptor(b, b_block)]
    while len(descriptors) < 6:
        descriptors += descriptors[:2]  # an absent pair's (never read: its depth is 0)
    low_k = 0
    if low is not None:
        low_k = rank_block(low[0].shape[1])
        low_descriptors = [_descriptor(low[0], [BLOCK_M, low_k]),
                           _descriptor(low[1], [BLOCK_N, low_k] if transposed else [low_k, BLOCK_N])]
    else:
        low_descriptors = descriptors[:2]
    c = _descriptor(out, [BLOCK_M, BLOCK_N])
    tiles = -(-rows // BLOCK_M) * -(-columns // BLOCK_N)
    constants = launch_arguments(rows, columns, [a.shape[1] for a, _ in looped], low_k, transposed, False,
                                 _programs(out.device, tiles))
    with launching_on(out):
        _kernel()[(constants["PROGRAMS"],)](c, c, c, c, rows, *descriptors, *low_descriptors, *_NO_BACKWARD,
                                            num_warps=4, **constants)
    return out


def gated_input_gradient(grad_output: torch.Tensor, weight: torch.Tensor, grad_low: torch.Tensor,
                         lora_a: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A gated MLP's down projection, backward: d h = dy @ W + g_low @ (sA) (the sum `sum_of_products` computes for
    dy (M, D), W (D, N), g_low (M, r), sA (r, N)) with the activation's backward in the epilogue, so that d h is
    neither written nor read back: (d gate, d up, partials) for h = act(gate) * up, d gate and d up new (M, N)
    tensors, partials (row tiles, r, N) float32 whose sum over the row tiles is g_low^T @ h, the adapter's A
    gradient. gate and up (M, N) have contiguous rows. The caller checks `available` and TMA's alignment."""
    from litft.triton_support import launching_on

    rows, depth = grad_output.shape
    columns = weight.shape[1]
    rank = grad_low.shape[1]
    grad_low = grad_low.contiguous()
    grad_gate = torch.empty((rows, columns), dtype=gate.dtype, device=gate.device)
    grad_up = torch.empty((rows, columns), dtype=gate.dtype, device=gate.device)
    row_tiles = -(-rows // BLOCK_M)
    partials = torch.empty((row_tiles, rank, columns), dtype=torch.float32, device=gate.device)
    low_k = rank_block(rank)
    descriptors = [_descriptor(grad_output, [BLOCK_M, BLOCK_K]), _descriptor(weight, [BLOCK_K, BLOCK_N])] * 3
    low_descriptors = [_descriptor(grad_low, [BLOCK_M, low_k]), _descriptor(lora_a, [low_k, BLOCK_N])]
    constants = launch_arguments(rows, columns, [depth], low_k, False, False,
                                 _programs(gate.device, row_tiles * -(-columns // BLOCK_N)), backward_rank=rank)
    constants["GELU"] = activation == "gelu_tanh"
    with launching_on(gate):
        _kernel()[(constants["PROGRAMS"],)](
            *descriptors[:1] * 4, rows, *descriptors, *low_descriptors,
            gate, up, grad_low, grad_gate, grad_up, partials, gate.stride(0), up.stride(0),
            num_warps=4, **constants,
        )
    return grad_gate, grad_up, partials


def gated_projections(x: torch.Tensor, weights: torch.Tensor, low: torch.Tensor, blocks: torch.Tensor,
                      activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`lora_gemm.gated_projections`' three outputs (gate, up, h) through one kernel: x (M, K), the frozen weights
    back to back (2N, K), low (M, 2r) and diag(B_gate, B_up) (2N, 2r)."""
    from litft.triton_support import launching_on

    rows, depth = x.shape
    columns = weights.shape[0] // 2
    half = BLOCK_N // 2
    outputs = [torch.empty((rows, columns), dtype=x.dtype, device=x.device) for _ in range(3)]
    low_k = rank_block(low.shape[1])
    descriptors = [_descriptor(x, [BLOCK_M, BLOCK_K]),
                   _descriptor(weights.view(2, columns, depth), [2, half, BLOCK_K])] * 3
    low_descriptors = [_descriptor(low, [BLOCK_M, low_k]),
                       _descriptor(blocks.view(2, columns, blocks.shape[1]), [2, half, low_k])]
    out_descriptors = [_descriptor(output, [BLOCK_M, half]) for output in outputs]
    tiles = -(-rows // BLOCK_M) * -(-columns // half)
    constants = launch_arguments(rows, columns, [depth], low_k, True, True, _programs(x.device, tiles))
    constants["GELU"] = activation == "gelu_tanh"
    with launching_on(x):
        _kernel()[(constants["PROGRAMS"],)](out_descriptors[0], *out_descriptors, rows, *descriptors,
                                            *low_descriptors, *_NO_BACKWARD, num_warps=4, **constants)
    return tuple(outputs)
