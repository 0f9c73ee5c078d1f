"""A frozen projection and its adapter's update in one GEMM: C = sum_j A_j @ B_j (or B_j^T).

The grouped LoRA operator (`litft.adapters.lora_projections`) computes, per projection,
    forward:         y = x @ W^T + low @ B^T                  (low = x @ (sA)^T, rank-deep)
    input gradient:  dx = dy_1 @ W_1 + ... + g_low @ (sA)     (g_low = dy @ B, one per group)
Through cuBLAS each sum is a rank-deep GEMM that writes an output-sized tensor and a base GEMM that reads it back
as its addend (beta = 1): on llama-8b's MLP that is 235 MB written and read again per projection and pass. Here
the rank-deep operands are one more stretch of the reduction: a persistent Triton kernel walks each tile's K
through every pair (A_j, B_j) into one float32 accumulator and writes C once. Operands are read through TMA
descriptors (Hopper and later); a pair with a short K (the adapters' rank) reads one zero-padded block.

Which path is faster depends on the shape and the GPU. On an H200 (benchmarks/NOTES.md, sections 14-15) the
kernel wins by 1-6% on every llama-1b projection and ties or wins by 1-2% on llama-8b's (cuBLAS keeps o's forward
and q/k/v's input gradient there); a LoRA llama-1b step gains 2-3%, a llama-8b step stays within the run-to-run
spread (+0.2%).
So each shape is timed once, on its first call, through cuBLAS and through the kernel, and the faster is kept
(as cuDNN's benchmark mode does): the first training step takes some seconds more, for the kernel's
compilations. On Hopper a third candidate, for the calls whose reduction is short, is the same sum through
`litft.adapters.lora_gemm_pingpong`'s warp-specialized kernel; and a gated MLP's backward through its down
projection (`gated_input_gradient`) is timed against that kernel with the activation's backward in its epilogue.
`LITFT_LORA_GEMM=cublas`, `=triton` or `=warp_specialized` forces a path (benchmarks, tests); under
`torch.use_deterministic_algorithms(True)` `auto` takes cuBLAS, since a timing can choose differently between runs.

The widths (N and each K) are compile-time constants of the kernel, as in inductor's GEMM templates: with the
loops' trip counts known the pipelined loads keep up (as runtime arguments the kernel ran 8-20% slower on the
MLP's projections, against cuBLAS in the same call); only the token count M is a runtime argument, so a model
compiles one kernel per kind of projection.

Numerics: the kernel rounds the whole sum once, where cuBLAS rounds the update to the output dtype before adding
it; the results differ by that rounding.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from litft.triton_support import interpreting, launching_on, multiprocessor_count, triton_available

# (BLOCK_M, BLOCK_N, BLOCK_K, pipeline stages, warps): the shapes inductor's autotuner picked for llama's
# projections on an H200 (NOTES.md, section 14). The first that compiles is the one used: the first won or tied
# on every llama shape measured; the others are for GPUs with less shared memory.
CONFIGS = ((128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 4, 8), (128, 128, 64, 4, 8))
# Below this many rows a GEMM is launch-bound (decoding, short evaluation prompts): cuBLAS, nothing timed.
SMALLEST_ROWS = 1024
# The kernel loops over up to three pairs' reductions (a group's frozen weights: q/k/v apart, gate and up) and
# takes a last pair whose reduction fits one block (the adapters' stacked ranks) without a loop.
LOOPED_PAIRS = 3
LOW_RANK_BLOCK = 64
MOST_PAIRS = LOOPED_PAIRS + 1
# Tiles run in groups of this many row tiles, each group walking all the column tiles, so that the tiles in flight
# share A's rows and B's columns in L2. 16 rather than 8: at llama-8b's widths (8,192 tokens) B is read from memory
# half as often, and under the H200's power limit, where a training step runs, the kernel is 0.5-3% faster for it
# (NOTES.md, section 18).
GROUP_ROWS = 16
CUBLAS = -1  # the choice "the caller's cuBLAS path"
# The choice "lora_gemm_pingpong's warp-specialized kernel" (Hopper), a candidate only where the long pairs' reduction
# is at most this deep (NOTES.md, section 28): on llama-1b's 2,048- and 3,072-deep calls it made the step 1.4% faster
# at 7% less energy; on llama-8b's 4,096-deep ones, faster alone at full clock, it left the power-bound step where
# it was (so those keep the paths their rows were measured with); deeper, its narrower tiles lost 1-6%, which
# `auto`'s timing, at full clock, would not always see.
WARP_SPECIALIZED = len(CONFIGS)
WARP_SPECIALIZED_DEEPEST = 3072
warp_specialized_enabled = True  # benchmarks switch the candidate off for their A/B

# A kind of call of its own: down's input gradient with the gated activation's backward in the warp-specialized
# kernel's epilogue (`gated_input_gradient`), timed against the two kernels it replaces.
ACTIVATION_BACKWARD_LABEL = "down input gradient with the activation's backward"
activation_backward_enabled = True  # benchmarks switch it off for their A/B

_choices: dict[tuple, int] = {}
_timings: dict[tuple, dict[int, float]] = {}  # ms per call of each path `auto` timed, for choices()


@functools.cache
def _tensor_descriptors_available() -> bool:
    """Triton with host-side TMA descriptors (3.4 and later)."""
    return triton_available() and importlib.util.find_spec("triton.tools.tensor_descriptor") is not None


def _forced() -> str:
    setting = os.environ.get("LITFT_LORA_GEMM", "auto")
    if setting not in ("auto", "cublas", "triton", "warp_specialized"):
        raise ValueError(f"LITFT_LORA_GEMM={setting!r}: expected auto, cublas, triton or warp_specialized")
    return setting


def rank_deep_split(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list, tuple | None]:
    """The pairs whose reductions the kernels loop over, and the last pair apart where it is rank-deep (at most
    LOW_RANK_BLOCK deep: the adapters' stacked ranks, one block), else None."""
    if len(pairs) > 1 and pairs[-1][0].shape[1] <= LOW_RANK_BLOCK:
        return list(pairs[:-1]), pairs[-1]
    return list(pairs), None


def _warp_specialized_takes(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether the warp-specialized kernel is a candidate for these operands (which `can_fuse` accepted): a Hopper
    GPU with Gluon, the long pairs' reduction at most WARP_SPECIALIZED_DEEPEST deep."""
    from litft.adapters import lora_gemm_pingpong

    if not warp_specialized_enabled or not pairs[0][0].is_cuda or not lora_gemm_pingpong.available(pairs[0][0].device):
        return False
    looped, _ = rank_deep_split(pairs)
    return len(looped) <= LOOPED_PAIRS and sum(a.shape[1] for a, _ in looped) <= WARP_SPECIALIZED_DEEPEST


def can_fuse(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether the kernel can read these operands: 2-D, rows contiguous, strides and addresses 16-byte aligned
    (TMA's rule), one dtype, on a Hopper-or-later GPU (or in Triton's interpreter, on CPU)."""
    if not pairs or len(pairs) > MOST_PAIRS or not _tensor_descriptors_available():
        return False
    if len(pairs) == MOST_PAIRS and pairs[-1][0].shape[1] > LOW_RANK_BLOCK:
        return False
    first = pairs[0][0]
    if first.is_cuda:
        # TMA is NVIDIA's (Hopper and later); ROCm reports its own capability numbers.
        if interpreting() or torch.version.hip or torch.cuda.get_device_capability(first.device) < (9, 0):
            return False
        dtypes = (torch.bfloat16, torch.float16)
    elif interpreting():
        dtypes = (torch.bfloat16, torch.float16, torch.float32)  # float32: exact sums for the CPU tests
    else:
        return False
    if first.dtype not in dtypes:
        return False
    for tensor in (tensor for pair in pairs for tensor in pair):
        if tensor.dim() != 2 or tensor.numel() == 0 or tensor.dtype != first.dtype or tensor.device != first.device:
            return False
        size = tensor.element_size()
        if tensor.stride(1) != 1 or (tensor.stride(0) * size) % 16 or tensor.data_ptr() % 16:
            return False
    return True


def choices() -> list[str]:
    """The timings' outcomes so far, one line per kind of call: the widths, the layout, the path kept and, where
    `auto` timed them, each path's milliseconds per call."""
    lines = []
    for key, choice in _choices.items():
        rows, widths, transposed = key[:3]
        path = _path_name(choice, key)
        if choice not in (CUBLAS, WARP_SPECIALIZED):
            path += " " + "x".join(map(str, CONFIGS[choice]))
        kind = "forward" if transposed else "input gradient"
        if len(key) > 6:  # a kind of call with a label of its own (gated_projections')
            kind = key[5]
        timed = ", ".join(f"{_path_name(index, key)} {ms:.3f} ms"
                          for index, ms in _timings.get(key, {}).items())
        lines.append(f"{kind} {rows} tokens, (K, N) {list(widths)}: {path}" + (f" ({timed})" if timed else ""))
    return lines


def _path_name(choice: int, key: tuple = ()) -> str:
    if choice == CUBLAS and len(key) > 6 and key[5].startswith(ACTIVATION_BACKWARD_LABEL):
        return "apart"  # the caller's path: d h through `sum_of_products`, then the activation's backward kernel
    return {CUBLAS: "cublas", WARP_SPECIALIZED: "warp-specialized kernel"}.get(choice, "kernel")


def sum_of_products(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], transposed: bool, cublas: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """sum_j A_j @ B_j^T (`transposed`: each B_j stored (N, K_j)) or sum_j A_j @ B_j (B_j stored (K_j, N)), a new
    (M, N) tensor: through the kernel where it takes these operands and was the faster for their shape, else
    `cublas()`, the caller's own computation of the same sum."""
    forced = _forced()
    rows = pairs[0][0].shape[0]
    columns = pairs[0][1].shape[0 if transposed else 1]
    for a, b in pairs:
        depth, width = (b.shape[1], b.shape[0]) if transposed else b.shape
        if a.shape[0] != rows or width != columns or a.shape[1] != depth:
            raise ValueError(f"sum_of_products: pairs of shapes {[(tuple(a.shape), tuple(b.shape)) for a, b in pairs]} "
                             f"do not make one ({rows}, {columns}) sum")
    if _cublas_only(forced, rows) or not can_fuse(pairs):
        return cublas()
    key = (*choice_key(pairs, transposed), forced)
    return _chosen(key, functools.partial(_run, pairs, transposed), cublas, pairs[0][0],
                   functools.partial(_warp_specialized_takes, pairs))


def _cublas_only(forced: str, rows: int) -> bool:
    """Whether a call takes the caller's path without considering the kernel: forced, or under `auto` a launch-bound
    token count or torch.use_deterministic_algorithms (a timing could choose differently in the next run)."""
    return forced == "cublas" or (
        forced == "auto" and (rows < SMALLEST_ROWS or torch.are_deterministic_algorithms_enabled())
    )


def _chosen(key: tuple, run: Callable[[int], Any], cublas: Callable[[], Any], first: torch.Tensor,
            warp_specialized: Callable[[], bool] = lambda: False, configurations: bool = True) -> Any:
    """A call of a kind (`key`, which ends with LITFT_LORA_GEMM's setting): `run(config)` (the kernel in a
    configuration, or WARP_SPECIALIZED where `warp_specialized()` says that kernel takes the operands) or
    `cublas()`, as chosen on the first call of its kind (`auto`: timed) and kept for the next; what the chosen
    path computed. (`warp_specialized` is asked only when a choice is made, not on every call.)
    `configurations` False: the kind has no Triton kernel, only `cublas()` and the warp-specialized one."""
    choice = _choices.get(key)
    if choice is not None:
        return cublas() if choice == CUBLAS else run(choice)
    if key[-1] == "warp_specialized" and warp_specialized():
        _choices[key] = WARP_SPECIALIZED
        return run(WARP_SPECIALIZED)
    if key[-1] in ("triton", "warp_specialized"):
        if not configurations:  # no Triton kernel of this kind: the caller's path
            _choices[key] = CUBLAS
            return cublas()
        _choices[key], result = _first_that_compiles(run)  # the first configuration that compiles, found once
        return result
    if first.is_cuda and torch.cuda.is_current_stream_capturing():
        return cublas()  # timing would synchronize inside a CUDA-graph capture
    choice, _timings[key] = _fastest(run, cublas, first.is_cuda, warp_specialized(), configurations)
    _choices[key] = choice
    return cublas() if choice == CUBLAS else run(choice)


def choice_key(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], transposed: bool) -> tuple:
    """What a timing is kept for: the widths, the layout, the dtype, the GPU, and the token count rounded up to a
    power of two (batches of varying length would otherwise each be timed)."""
    first = pairs[0][0]
    rows = 1 << (first.shape[0] - 1).bit_length()
    widths = tuple((a.shape[1], b.shape[0] if transposed else b.shape[1]) for a, b in pairs)
    device = torch.cuda.get_device_name(first.device) if first.is_cuda else "cpu"
    return rows, widths, transposed, first.dtype, device


def _out_of_shared_memory(error: Exception) -> bool:
    """Whether a launch failed because its configuration's blocks do not fit the GPU's shared memory."""
    return "OutOfResources" in type(error).__name__ or "out of resource" in str(error).lower()


def _first_that_compiles(run: Callable[[int], Any]) -> tuple[int, Any]:
    """The first configuration that compiles for `run`'s operands, and what it computed."""
    for index in range(len(CONFIGS)):
        try:
            return index, run(index)
        except Exception as error:  # noqa: BLE001 - re-raised unless it is a configuration too large to compile
            if not _out_of_shared_memory(error):
                raise
    raise RuntimeError("no configuration of the LoRA GEMM kernel fits this GPU's shared memory")


TIMING_ROUNDS = 3
CALLS_PER_ROUND = 4
# Each timed round starts behind a wait of the GPU's own (a spin of this many clock cycles, ~2 ms at an H200's
# clock) so the host has queued the round's calls before the GPU reaches them. Without it a round started on an
# idle GPU and timed the host's launches too: a Triton launch (descriptors built in Python) costs the host several
# times what cuBLAS's does, while in a training step the host runs ahead and neither is seen. That bias made
# `auto` keep cuBLAS on shapes the kernel wins (NOTES.md, section 15).
QUEUE_AHEAD_CYCLES = 4_000_000


def _fastest(run: Callable[[int], Any], cublas: Callable[[], Any], on_gpu: bool,
             warp_specialized: bool = False, configurations: bool = True) -> tuple[int, dict[int, float]]:
    """CUBLAS, the index of the first kernel configuration that compiles for `run`'s operands or (where
    `warp_specialized`) WARP_SPECIALIZED, whichever was fastest, and each one's time (ms per call): each runs once
    to warm up (a kernel's first call compiles it), then all are timed in alternating rounds and each keeps its
    best round, so that a GPU's clock drifting during the measurement does not decide. On CPU (the interpreter)
    the kernel, untimed."""
    if not on_gpu:
        return (0 if configurations else CUBLAS), {}
    candidates = {}
    # The first training step may run under torch.cuda.set_sync_debug_mode("error") (tests of a step that never
    # waits for the host): this one-time measurement waits on purpose.
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        # cuBLAS (the caller's path), then the first kernel configuration that compiles, where the kind has them
        for index in (CUBLAS, *(range(len(CONFIGS)) if configurations else ())):
            function = cublas if index == CUBLAS else functools.partial(run, index)
            try:
                function()
            except Exception as error:  # noqa: BLE001 - see _first_that_compiles
                if index == CUBLAS or not _out_of_shared_memory(error):
                    raise
                continue
            candidates[index] = function
            if index != CUBLAS:
                break
        if warp_specialized:
            function = functools.partial(run, WARP_SPECIALIZED)
            try:
                function()
                candidates[WARP_SPECIALIZED] = function
            except Exception as error:  # noqa: BLE001 - an optional candidate: training goes on without it
                warnings.warn(f"litft: the warp-specialized LoRA GEMM failed ({type(error).__name__}: {error}); "
                              "the other paths are timed without it", stacklevel=2)
        best = dict.fromkeys(candidates, float("inf"))
        for _ in range(TIMING_ROUNDS):
            for index, function in candidates.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(QUEUE_AHEAD_CYCLES)
                start.record()
                for _ in range(CALLS_PER_ROUND):
                    function()
                end.record()
                end.synchronize()
                best[index] = min(best[index], start.elapsed_time(end) / CALLS_PER_ROUND)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return min(best, key=best.get), best


# The kernels' jitted helpers, module globals once built: Triton resolves calls through globals.
_accumulate = None
_tile_origin = None
activation_and_slope = None


def _helpers() -> None:
    """Builds the helpers the kernels call, afresh with each kernel (each builder is cached): on first use, not at
    import, since Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) is chosen when a function is decorated."""
    import triton
    import triton.language as tl

    global _accumulate, _tile_origin

    def accumulate(acc, a_desc, b_desc, row, column, DEPTH: tl.constexpr, BLOCK_K: tl.constexpr,
                   TRANSPOSED: tl.constexpr):
        for k in tl.range(0, DEPTH, BLOCK_K):
            a = a_desc.load([row, k])  # (BLOCK_M, BLOCK_K)
            if TRANSPOSED:
                acc = tl.dot(a, b_desc.load([column, k]).T, acc)  # B stored (N, K): a (BLOCK_N, BLOCK_K) block
            else:
                acc = tl.dot(a, b_desc.load([k, column]), acc)  # B stored (K, N): a (BLOCK_K, BLOCK_N) block
        return acc

    def tile_origin(tile, rows, COLUMNS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    GROUP_M: tl.constexpr):
        """A tile's first row and column: tiles run in groups of GROUP_M row tiles, each group walking all the
        column tiles, so that the tiles in flight at once share their operands' blocks in L2. Not tl.cdiv: triton
        .language's own jitted helpers are built when triton is imported, and so are not interpreted in a process
        that chose the interpreter later (the CPU tests)."""
        row_tiles = (rows + BLOCK_M - 1) // BLOCK_M
        column_tiles = (COLUMNS + BLOCK_N - 1) // BLOCK_N
        tiles_per_group = GROUP_M * column_tiles
        group = tile // tiles_per_group
        first_row_tile = group * GROUP_M
        group_rows = tl.minimum(row_tiles - first_row_tile, GROUP_M)
        row = ((first_row_tile + (tile % tiles_per_group) % group_rows) * BLOCK_M).to(tl.int32)
        column = (((tile % tiles_per_group) // group_rows) * BLOCK_N).to(tl.int32)
        return row, column

    _accumulate = triton.jit(accumulate)
    _tile_origin = triton.jit(tile_origin)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    _helpers()

    @triton.jit
    def sum_of_products_kernel(
        c_pointer, c_desc, c_row_stride, rows, a0, b0, a1, b1, a2, b2, low_a, low_b,
        # The model's widths are compile-time constants (as in inductor's GEMM templates), so the pipelined loops
        # know their trip counts; only the token count varies between calls.
        COLUMNS: tl.constexpr, DEPTH0: tl.constexpr, DEPTH1: tl.constexpr, DEPTH2: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K0: tl.constexpr, BLOCK_K1: tl.constexpr, BLOCK_K2: tl.constexpr, LOW_BLOCK_K: tl.constexpr,
        TRANSPOSED: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr, STORE_THROUGH_TMA: tl.constexpr,
    ):
        # Not tl.zeros: triton.language's own jitted helpers are not interpreted (see tile_origin).
        tiles = ((rows + BLOCK_M - 1) // BLOCK_M) * ((COLUMNS + BLOCK_N - 1) // BLOCK_N)
        # Persistent: each program walks tiles PROGRAMS apart.
        for tile in tl.range(tl.program_id(0), tiles, PROGRAMS):
            row, column = _tile_origin(tile, rows, COLUMNS, BLOCK_M, BLOCK_N, GROUP_M)
            if LOW_BLOCK_K > 0:
                # The rank-deep pair is one block: loaded as the tile starts, so that it arrives while the long
                # reductions run, and multiplied after them (no second pipelined loop per tile).
                low = low_a.load([row, 0])  # (BLOCK_M, LOW_BLOCK_K)
                update = low_b.load([column, 0]) if TRANSPOSED else low_b.load([0, column])
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
            acc = _accumulate(acc, a0, b0, row, column, DEPTH0, BLOCK_K0, TRANSPOSED)
            if BLOCK_K1 > 0:
                acc = _accumulate(acc, a1, b1, row, column, DEPTH1, BLOCK_K1, TRANSPOSED)
            if BLOCK_K2 > 0:
                acc = _accumulate(acc, a2, b2, row, column, DEPTH2, BLOCK_K2, TRANSPOSED)
            if LOW_BLOCK_K > 0:
                acc = tl.dot(low, update.T if TRANSPOSED else update, acc)
            if STORE_THROUGH_TMA:
                c_desc.store([row, column], acc.to(c_desc.dtype))
            else:
                out_rows = row + tl.arange(0, BLOCK_M)
                out_columns = column + tl.arange(0, BLOCK_N)
                inside = (out_rows[:, None] < rows) & (out_columns[None, :] < COLUMNS)
                pointers = c_pointer + out_rows[:, None].to(tl.int64) * c_row_stride + out_columns[None, :]
                tl.store(pointers, acc.to(c_pointer.dtype.element_ty), mask=inside)

    return sum_of_products_kernel


def smallest_block(depth: int) -> int:
    """A reduction's block for a depth below the configuration's: a power of two, at least the tensor cores'
    smallest reduction (16)."""
    return max(16, 1 << (depth - 1).bit_length())


def _run(pairs, transposed: bool, config: int, store_through_tma: bool = False,
         prefetch_low: bool = True, group_rows: int | None = None) -> torch.Tensor:
    """The sum through the kernel in configuration `config`. `store_through_tma`, `prefetch_low` and `group_rows`
    are variants that `benchmarks/bench_kernels.py --only lora_gemm` compares (NOTES.md sections 14 and 18); the
    defaults are what training runs (`group_rows` None: `GROUP_ROWS`)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if config == WARP_SPECIALIZED:
        from litft.adapters import lora_gemm_pingpong

        return lora_gemm_pingpong.sum_of_products(pairs, transposed)
    block_m, block_n, block_k, stages, warps = CONFIGS[config]
    rows = pairs[0][0].shape[0]
    columns = pairs[0][1].shape[0] if transposed else pairs[0][1].shape[1]
    out = torch.empty((rows, columns), dtype=pairs[0][0].dtype, device=pairs[0][0].device)

    def blocks(a, b, step):
        return (TensorDescriptor.from_tensor(a, [block_m, step]),
                TensorDescriptor.from_tensor(b, [block_n, step] if transposed else [step, block_n]))

    looped, low_pair = rank_deep_split(pairs) if prefetch_low else (list(pairs), None)
    if len(looped) > LOOPED_PAIRS:
        raise ValueError(f"at most {LOOPED_PAIRS} pairs besides a rank-deep one")
    arguments, constants = [], {}
    for index in range(LOOPED_PAIRS):
        if index >= len(looped):
            # An absent pair passes the last pair's descriptors again (never read: its BLOCK_K is 0). Reused, not
            # rebuilt: building a descriptor is a few microseconds of the host's launch, which is already several
            # times cuBLAS's (NOTES.md, section 15).
            arguments += arguments[-2:]
            constants[f"BLOCK_K{index}"] = constants[f"DEPTH{index}"] = 0
            continue
        a, b = looped[index]
        depth = a.shape[1]
        step = block_k if depth >= block_k else smallest_block(depth)
        arguments += blocks(a, b, step)
        constants[f"BLOCK_K{index}"] = step
        constants[f"DEPTH{index}"] = depth
    if low_pair is not None:
        arguments += blocks(*low_pair, smallest_block(low_pair[0].shape[1]))
        constants["LOW_BLOCK_K"] = smallest_block(low_pair[0].shape[1])
    else:
        arguments += arguments[:2]
        constants["LOW_BLOCK_K"] = 0
    tiles = -(-rows // block_m) * -(-columns // block_n)
    programs = min(multiprocessor_count(out.device), tiles)
    with launching_on(out):
        _kernel()[(programs,)](
            out, TensorDescriptor.from_tensor(out, [block_m, block_n]), out.stride(0), rows, *arguments,
            COLUMNS=columns, BLOCK_M=block_m, BLOCK_N=block_n, TRANSPOSED=transposed,
            GROUP_M=GROUP_ROWS if group_rows is None else group_rows, PROGRAMS=programs,
            STORE_THROUGH_TMA=store_through_tma, num_stages=stages, num_warps=warps, **constants,
        )
    return out


@functools.cache
def _gated_kernel():
    global activation_and_slope
    import triton
    import triton.language as tl

    from litft.adapters import gated_activation

    _helpers()
    activation_and_slope = gated_activation.jitted_activation()

    @triton.jit
    def gated_projections_kernel(
        gate_out, up_out, product_out, rows, x, weights, low, updates,
        COLUMNS: tl.constexpr, DEPTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, GELU: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr,
    ):
        # A tile is BLOCK_N of gate's columns and the same BLOCK_N of up's: the frozen weights lie back to back,
        # (2, N, K), and one block [2, BLOCK_N, BLOCK_K] of them is one (2 BLOCK_N, BLOCK_K) operand, so the tile
        # is one GEMM twice as wide, [gate | up], and h = act(gate) * up of its columns is formed in registers.
        tiles = ((rows + BLOCK_M - 1) // BLOCK_M) * ((COLUMNS + BLOCK_N - 1) // BLOCK_N)
        for tile in tl.range(tl.program_id(0), tiles, PROGRAMS):
            row, column = _tile_origin(tile, rows, COLUMNS, BLOCK_M, BLOCK_N, GROUP_M)
            # The adapters' low-rank inputs [low_gate | low_up] and diag(B_gate, B_up)'s rows for these columns,
            # loaded while the long reduction runs.
            low_block = low.load([row, 0])  # (BLOCK_M, rank block)
            update_block = updates.load([0, column, 0]).reshape(2 * BLOCK_N, low_block.shape[1])
            acc = tl.full((BLOCK_M, 2 * BLOCK_N), 0.0, dtype=tl.float32)
            for k in tl.range(0, DEPTH, BLOCK_K):
                acc = tl.dot(x.load([row, k]), weights.load([0, column, k]).reshape(2 * BLOCK_N, BLOCK_K).T, acc)
            acc = tl.dot(low_block, update_block.T, acc)
            gate, up = acc.reshape(BLOCK_M, 2, BLOCK_N).permute(0, 2, 1).split()  # (BLOCK_M, BLOCK_N) each
            # Stored through TMA, which clips a partial tile.
            gate = gate.to(gate_out.dtype)
            up = up.to(up_out.dtype)
            gate_out.store([row, column], gate)
            up_out.store([row, column], up)
            # h from gate and up as stored (rounded), as the elementwise kernel would read them back.
            value, _ = activation_and_slope(gate.to(tl.float32), GELU)
            product_out.store([row, column], (value * up.to(tl.float32)).to(product_out.dtype))

    return gated_projections_kernel


def gated_projections(
    x: torch.Tensor, weights: torch.Tensor, low: torch.Tensor, updates: tuple[torch.Tensor, torch.Tensor],
    activation: str, separately: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A gated MLP's gate and up projections with their adapters, and h = act(gate) * up: gate = x @ W_gate^T +
    low_gate @ B_gate^T and up likewise, from x (M, K), the frozen weights back to back `weights` (2N, K) =
    [W_gate; W_up], `low` (M, 2r) = [low_gate | low_up] and `updates` (B_gate, B_up), each (N, r); all three new
    (M, N) tensors.

    Through one kernel where it takes these operands and was the faster: its tiles hold the same columns of gate
    and of up, one GEMM as wide as two, so h is formed in registers and written with them, where the elementwise
    product would read gate and up back from memory (at llama-8b's width 470 MB per layer and step). Otherwise
    `separately()`, the caller's computation of the same three. `auto` times the two once per kind of call, like
    `sum_of_products`; h is formed from gate and up as rounded to their dtype, so both paths compute the same h
    from the same gate and up. `blocks`: diag(B_gate, B_up) (2N, 2r) where the caller laid it out already."""
    forced = _forced()
    if _cublas_only(forced, x.shape[0]):
        return separately()
    columns, rank = updates[0].shape
    if blocks is None:  # else laid out by the block's call (`litft.adapters.adapter_copies`)
        blocks = torch.block_diag(*updates)  # (2N, 2r): [B_gate, 0; 0, B_up]
    pairs = [(x, weights), (low, blocks)]
    if not (
        can_fuse(pairs) and weights.shape[0] == 2 * columns and updates[1].shape == (columns, rank)
        and 2 * rank <= LOW_RANK_BLOCK
    ):
        return separately()
    key = (*choice_key(pairs, True), f"gate and up forward, {activation} product,", forced)
    return _chosen(key, functools.partial(_run_gated, x, weights, low, blocks, activation), separately, x,
                   functools.partial(_warp_specialized_takes, pairs))


def _run_gated(x, weights, low, blocks, activation: str, config: int) -> tuple[torch.Tensor, ...]:
    """gated_projections through the kernel in configuration `config` (its BLOCK_N split between gate and up);
    `blocks` is diag(B_gate, B_up) (2N, 2r)."""
    if config == WARP_SPECIALIZED:
        from litft.adapters import lora_gemm_pingpong

        return lora_gemm_pingpong.gated_projections(x, weights, low, blocks, activation)
    from triton.tools.tensor_descriptor import TensorDescriptor

    block_m, block_n, block_k, stages, warps = CONFIGS[config]
    block_n //= 2
    rows, depth = x.shape
    columns = weights.shape[0] // 2
    outputs = [torch.empty((rows, columns), dtype=x.dtype, device=x.device) for _ in range(3)]
    step = block_k if depth >= block_k else smallest_block(depth)
    rank_block = smallest_block(low.shape[1])
    tiles = -(-rows // block_m) * -(-columns // block_n)
    programs = min(multiprocessor_count(x.device), tiles)
    with launching_on(x):
        _gated_kernel()[(programs,)](
            *(TensorDescriptor.from_tensor(output, [block_m, block_n]) for output in outputs), rows,
            TensorDescriptor.from_tensor(x, [block_m, step]),
            TensorDescriptor.from_tensor(weights.view(2, columns, depth), [2, block_n, step]),
            TensorDescriptor.from_tensor(low, [block_m, rank_block]),
            TensorDescriptor.from_tensor(blocks.view(2, columns, blocks.shape[1]), [2, block_n, rank_block]),
            COLUMNS=columns, DEPTH=depth, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=step,
            GELU=activation == "gelu_tanh", GROUP_M=GROUP_ROWS, PROGRAMS=programs, num_stages=stages,
            num_warps=warps,
        )
    return tuple(outputs)


def gated_input_gradient(
    grad_output: torch.Tensor, frozen_weight: Callable[[], torch.Tensor], grad_low: torch.Tensor,
    lora_a: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str,
    apart: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of a LoRA down projection that reads h = act(gate) * up: (d gate, d up, g_low^T @ h) from dy
    (M, D), down's frozen weight W (D, N) (`frozen_weight()`, called only where it is needed: a 4-bit base
    dequantizes), g_low (M, r), sA (r, N) and gate, up (M, N) of one dtype with contiguous rows (`rows_of`); all in
    their dtype, the last summed in float32 and rounded once.

    `apart()` is the caller's two steps: d h = dy @ W + g_low @ (sA) through `sum_of_products`, written out, then the
    activation's backward kernel, which reads it back with gate and up. On Hopper the warp-specialized kernel can do
    the second step in its epilogue, on the tile of d h it has just summed (`lora_gemm_pingpong`, NOTES.md section
    29), while its other warp group multiplies: d h (235 MB per llama-8b layer) is neither written nor read. `auto`
    times the two once per kind of call, as for the other sums; `LITFT_LORA_GEMM=warp_specialized` forces the
    kernel, `cublas` and `triton` the two steps."""
    from litft.adapters import lora_gemm_pingpong
    from litft.adapters.adapter_gradients import summed_partials

    forced = _forced()
    rows, columns = gate.shape
    rank = grad_low.shape[1]
    # sA stands in for W in the checks and the key: (D, N) and (r, N) are the widths either way.
    pairs = [(grad_output, lora_a), (grad_low, lora_a)]
    if (
        _cublas_only(forced, rows) or not activation_backward_enabled
        or not grad_output.is_cuda or not lora_gemm_pingpong.available(grad_output.device)
        or not can_fuse(pairs) or lora_gemm_pingpong.rank_block(rank) is None or columns % 8
        or gate.dtype != grad_output.dtype
    ):
        return apart()

    def run(config: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weight = frozen_weight()
        if not can_fuse([(grad_output, weight), (grad_low, lora_a)]):
            return apart()
        grad_gate, grad_up, partials = lora_gemm_pingpong.gated_input_gradient(
            grad_output, weight, grad_low, lora_a, gate, up, activation)
        return grad_gate, grad_up, summed_partials([partials], gate.dtype)[0]

    key = (*choice_key(pairs, False), f"{ACTIVATION_BACKWARD_LABEL} ({activation}),", forced)
    return _chosen(key, run, apart, grad_output, lambda: True, configurations=False)
