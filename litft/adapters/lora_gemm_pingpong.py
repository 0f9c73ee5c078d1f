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
activation = tile_origin = load_blocks = loader = b_operand = consumer = None


@functools.cache
def _kernel():
    global gl, fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    global activation, tile_origin, load_blocks, loader, b_operand, consumer
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
    def consumer(rows, c, gate_out, up_out, product_out, low_a, low_b, a_ring, b_ring, ready, free, turns, staging,
                 product_staging, FIRST: gl.constexpr, COLUMNS: gl.constexpr, BLOCKS: gl.constexpr,
                 MAIN_BLOCKS: gl.constexpr, LOW_K: gl.constexpr, STEP_N: gl.constexpr, TRANSPOSED: gl.constexpr,
                 GATED: gl.constexpr, GELU: gl.constexpr, GROUP_M: gl.constexpr, PROGRAMS: gl.constexpr,
                 STAGES: gl.constexpr):
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
                gate = gate_tile.load(rows_layout).to(gl.float32)
                up = up_tile.load(rows_layout).to(gl.float32)
                value, _ = activation(gate, GELU)
                product_staging.store((value * up).to(product_staging.dtype))
                fence_async_shared()
                tma.async_copy_shared_to_global(product_out, [row, column], product_staging)
            else:
                tma.async_copy_shared_to_global(c, [row, column], staging)
            local += 2
        tma.store_wait(0)

    @gluon.jit
    def pingpong_kernel(
        c, gate_out, up_out, product_out, rows, a0, b0, a1, b1, a2, b2, low_a, low_b,
        COLUMNS: gl.constexpr, DEPTH0: gl.constexpr, DEPTH1: gl.constexpr, DEPTH2: gl.constexpr,
        LOW_K: gl.constexpr, TILE_N: gl.constexpr, STEP_N: gl.constexpr, BLOCKS: gl.constexpr,
        MAIN_BLOCKS: gl.constexpr, STAGE_BYTES: gl.constexpr, LOW_BYTES: gl.constexpr,
        TRANSPOSED: gl.constexpr, GATED: gl.constexpr, GELU: gl.constexpr, GROUP_M: gl.constexpr,
        PROGRAMS: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGISTERS: gl.constexpr,
        LOADER_REGISTERS: gl.constexpr,
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
        else:
            product_staging0 = staging0
            product_staging1 = staging1
        # The default partition (this kernel's 4 warps) is the first group; the workers are the second group and
        # the loading warp, each with its share of the register file.
        gl.warp_specialize(
            [
                (consumer, (rows, c, gate_out, up_out, product_out, low_a, low_b, a_ring, b_ring, ready, free, turns,
                            staging0, product_staging0, 0, COLUMNS, BLOCKS, MAIN_BLOCKS, LOW_K, STEP_N,
                            TRANSPOSED, GATED, GELU, GROUP_M, PROGRAMS, STAGES)),
                (consumer, (rows, c, gate_out, up_out, product_out, low_a, low_b, a_ring, b_ring, ready, free, turns,
                            staging1, product_staging1, 1, COLUMNS, BLOCKS, MAIN_BLOCKS, LOW_K, STEP_N,
                            TRANSPOSED, GATED, GELU, GROUP_M, PROGRAMS, STAGES)),
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
                     programs: int) -> dict:
    """The kernel's compile-time constants for a call (`benchmarks/compile_pingpong.py` builds them too)."""
    step_n = BLOCK_N // 2 if gated else BLOCK_N
    main_blocks = sum(-(-depth // BLOCK_K) for depth in depths)
    epilogue_bytes = 2 * BLOCK_M * BLOCK_N * 2 + (2 * BLOCK_M * step_n * 2 if gated else 0)
    padded = depths + [0] * (3 - len(depths))
    return dict(
        COLUMNS=columns, DEPTH0=padded[0], DEPTH1=padded[1], DEPTH2=padded[2], LOW_K=low_k, TILE_N=BLOCK_N,
        STEP_N=step_n, BLOCKS=main_blocks + (low_k > 0), MAIN_BLOCKS=main_blocks,
        STAGE_BYTES=(BLOCK_M + BLOCK_N) * BLOCK_K * 2, LOW_BYTES=(BLOCK_M + BLOCK_N) * low_k * 2,
        TRANSPOSED=transposed, GATED=gated, GELU=False, GROUP_M=lora_gemm.GROUP_ROWS, PROGRAMS=programs,
        STAGES=_stages(epilogue_bytes), CONSUMER_REGISTERS=CONSUMER_REGISTERS, LOADER_REGISTERS=LOADER_REGISTERS,
    )


def _programs(device: torch.device, tiles: int) -> int:
    from litft.triton_support import multiprocessor_count

    return max(1, min(multiprocessor_count(device), tiles))


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
        _kernel()[(constants["PROGRAMS"],)](c, c, c, c, rows, *descriptors, *low_descriptors, num_warps=4,
                                            **constants)
    return out


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
                                            *low_descriptors, num_warps=4, **constants)
    return tuple(outputs)
