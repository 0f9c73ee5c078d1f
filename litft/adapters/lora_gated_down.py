"""The down projection of a gated MLP, down(act(gate) * up), with its LoRA adapter, in one operator.

Llama's MLP is down(silu(gate) * up); Gemma's gates with GELU (tanh form). Computed as written, with the down
projection in the grouped LoRA operator (`litft.adapters.lora_projections`), the backward needs the product
h = act(gate) * up twice, and h is (tokens x intermediate), the widest activation of the block: for the adapter's
A gradient, d(sA) = g_low^T @ h (g_low = dy @ B, rank-sized), and, through autograd, for the activation's own
gradient. torch.compile keeps gate and up and recomputes h for the first. On an H200, per llama-8b layer and step
(benchmarks/NOTES.md, sections 9 and 16): the recomputation 164 us (read gate and up, write h), the rank-deep GEMM
that reads h back 57 us, then the activation's backward 270 us (read dh, gate, up; write d gate, d up).

Here the activation's backward kernel, which reads gate and up anyway, forms each tile of h in registers and adds
its share of g_low^T @ h to a float32 partial sum: h is neither recomputed into memory nor read back. The kernel
walks a 2-D grid of tiles, (row groups) x (column tiles); each program sums g_low^T @ h over its group of rows and
writes one (rank x columns) partial, and the partials (16 row groups: 2.5% of the bytes the kernel reads at llama's
widths) are summed afterwards, in a fixed order, so the result is the same in every run. The forward computes h with
an elementwise kernel of its own (inductor fused the same product before), then down's GEMMs as the grouped
operator does, including `lora_gemm`'s adapter-in-the-GEMM path.

Numerics: the activation in float32 and h rounded once to the activations' dtype (as inductor's fused kernel
computes it), both in the forward and where the backward forms h again, so the A gradient sees the h the forward
used. Without Triton (CPU, outside the interpreter) the same formulas run as torch operations.

Used where it applies (`gated_down`): a plain LoRA down projection that computes together (full-precision or 4-bit
base), no adapter dropout, a SiLU or tanh-GELU gate, gate and up of one shape. Everything else (no adapter, DoRA,
dropout, thunder) runs `down(act(gate) * up)` as before. Under offloaded activation checkpointing the output keeper
is consulted for down's output as the grouped operator does.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from litft.adapters import lora_projections as projections
from litft.adapters.adapter_gradients import padded_rank, summed_partials
from litft.triton_support import interpreting, kernels_run_on, launching_on

ACTIVATIONS = ("silu", "gelu_tanh")
ENABLED = True  # False: every model computes down(act(gate) * up) as written (the benchmarks' A/B)
# Forward: elements per program of the elementwise product.
PRODUCT_BLOCK = 2048
# Backward: tiles of (rows x columns), and the row groups whose partial A gradients are summed afterwards. Each
# group is at least MIN_GROUP_ROWS rows, so the partials stay small beside the tiles the kernel reads.
BLOCK_ROWS = 32  # the fastest of a sweep on an H200 at llama-8b's width (NOTES.md, section 16)
BLOCK_COLUMNS = 64
BACKWARD_WARPS = 4
MAX_ROW_GROUPS = 16
MIN_GROUP_ROWS = 512

activation_and_slope = None  # the kernels' shared activation, a module global once built (see _kernels)


@functools.cache
def _kernels():
    # Built on first use: the interpreter (TRITON_INTERPRET=1, the CPU tests) is chosen when a function is decorated.
    # No triton.language jitted helpers (tl.sigmoid, tl.zeros, tl.cdiv): they are built when triton is imported and
    # would not be interpreted in a process that chose the interpreter later. The kernels call a jitted function of
    # ours, which Triton resolves through the module's globals.
    global activation_and_slope
    import triton
    import triton.language as tl

    def activation(gate, GELU: tl.constexpr):
        """act(gate) and d act / d gate, in float32."""
        if GELU:
            # 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3); tanh(u) = 2 sigmoid(2u) - 1
            inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
            tanh = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
            value = 0.5 * gate * (1.0 + tanh)
            slope = 0.5 * (1.0 + tanh) + 0.5 * gate * (1.0 - tanh * tanh) * 0.7978845608028654 * (
                1.0 + 3 * 0.044715 * gate * gate)
        else:
            sigmoid = 1.0 / (1.0 + tl.exp(-gate))
            value = gate * sigmoid
            slope = sigmoid * (1.0 + gate * (1.0 - sigmoid))
        return value, slope

    activation_and_slope = triton.jit(activation)

    @triton.jit
    def gated_product(gate_ptr, up_ptr, out_ptr, count, columns, gate_row_stride, up_row_stride,
                      GELU: tl.constexpr, CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr):
        index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = index < count
        if CONTIGUOUS:
            gate_index, up_index = index, index
        else:  # rows of a wider tensor (the halves of a fused gate_up projection's output)
            row, column = index // columns, index % columns
            gate_index, up_index = row * gate_row_stride + column, row * up_row_stride + column
        gate = tl.load(gate_ptr + gate_index, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + up_index, mask=inside, other=0.0).to(tl.float32)
        value, _ = activation_and_slope(gate, GELU)
        tl.store(out_ptr + index, (value * up).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def gated_backward(
        grad_product_ptr, gate_ptr, up_ptr, grad_low_ptr, grad_gate_ptr, grad_up_ptr, partial_ptr,
        rows, columns, rank, group_rows, gate_row_stride, up_row_stride,
        GELU: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr, RANK_BLOCK: tl.constexpr,
        DOT_IN_FLOAT32: tl.constexpr,
    ):
        column_index = tl.program_id(0) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
        column_inside = column_index < columns
        rank_index = tl.arange(0, RANK_BLOCK)
        rank_inside = rank_index < rank
        group = tl.program_id(1)
        first_row = group * group_rows
        last_row = tl.minimum(first_row + group_rows, rows)
        partial = tl.full((RANK_BLOCK, BLOCK_COLUMNS), 0.0, tl.float32)  # sum over the group of g_low^T @ h
        for start in tl.range(first_row, last_row, BLOCK_ROWS):
            row_index = start + tl.arange(0, BLOCK_ROWS)
            row_inside = row_index < last_row
            offsets = row_index.to(tl.int64)[:, None] * columns + column_index[None, :]  # (BLOCK_ROWS, BLOCK_COLUMNS)
            inside = row_inside[:, None] & column_inside[None, :]
            grad_product = tl.load(grad_product_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            rows_64 = row_index.to(tl.int64)[:, None]
            gate = tl.load(gate_ptr + rows_64 * gate_row_stride + column_index[None, :], mask=inside,
                           other=0.0).to(tl.float32)
            up = tl.load(up_ptr + rows_64 * up_row_stride + column_index[None, :], mask=inside,
                         other=0.0).to(tl.float32)
            value, slope = activation_and_slope(gate, GELU)
            tl.store(grad_gate_ptr + offsets, (grad_product * up * slope).to(grad_gate_ptr.dtype.element_ty),
                     mask=inside)
            tl.store(grad_up_ptr + offsets, (grad_product * value).to(grad_up_ptr.dtype.element_ty), mask=inside)
            # h as the forward rounded it; masked rows and columns are zero (gate = up = 0 there).
            product = (value * up).to(grad_low_ptr.dtype.element_ty)
            grad_low_t = tl.load(  # (RANK_BLOCK, BLOCK_ROWS): g_low transposed, zero-padded to the dot's size
                grad_low_ptr + row_index.to(tl.int64)[None, :] * rank + rank_index[:, None],
                mask=rank_inside[:, None] & row_inside[None, :], other=0.0,
            )
            if DOT_IN_FLOAT32:
                partial += tl.dot(grad_low_t.to(tl.float32), product.to(tl.float32), input_precision="ieee")
            else:
                partial += tl.dot(grad_low_t, product)
        tl.store(
            partial_ptr + (group * rank + rank_index[:, None]).to(tl.int64) * columns + column_index[None, :],
            partial, mask=rank_inside[:, None] & column_inside[None, :],
        )

    return gated_product, gated_backward


def _activation_torch(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) in float32 through torch's own activations (CPU without the interpreter): a float32 model then
    computes what `down(act(gate) * up)` does, to the last bit (a fresh adapter leaves the base model unchanged)."""
    if activation == "gelu_tanh":
        return nn.functional.gelu(gate.float(), approximate="tanh")
    return nn.functional.silu(gate.float())


def _slope_torch(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """d act / d gate in float32, the kernels' formula as torch operations."""
    gate = gate.float()
    if activation == "gelu_tanh":
        tanh = torch.tanh(0.7978845608028654 * (gate + 0.044715 * gate**3))
        return 0.5 * (1 + tanh) + 0.5 * gate * (1 - tanh**2) * 0.7978845608028654 * (1 + 3 * 0.044715 * gate**2)
    sigmoid = torch.sigmoid(gate)
    return sigmoid * (1 + gate * (1 - sigmoid))


def gated_product(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up (M, N), computed in float32 and rounded once to the inputs' dtype, a new contiguous tensor.
    gate and up are (M, N) with contiguous rows (`rows_of`)."""
    if not kernels_run_on(gate) or gate.numel() == 0:
        return (_activation_torch(gate, activation) * up.float()).to(gate.dtype)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    count = gate.numel()
    contiguous = gate.is_contiguous() and up.is_contiguous()
    with launching_on(gate):
        _kernels()[0][((count + PRODUCT_BLOCK - 1) // PRODUCT_BLOCK,)](
            gate, up, out, count, gate.shape[1], gate.stride(0), up.stride(0),
            GELU=activation == "gelu_tanh", CONTIGUOUS=contiguous, BLOCK=PRODUCT_BLOCK,
        )
    return out


def rows_of(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (..., N) as (M, N) with contiguous rows: a view where its rows lie evenly apart (also the halves of
    a fused gate_up output), else a copy."""
    if tensor.stride(-1) == 1:
        try:
            flat = tensor.view(-1, tensor.shape[-1])
        except RuntimeError:  # leading dimensions that no single row stride spans
            flat = None
        if flat is not None and flat.stride(0) >= flat.shape[1]:
            return flat
    return tensor.reshape(-1, tensor.shape[-1]).contiguous()


def gated_backward(
    grad_product: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, grad_low: torch.Tensor, activation: str,
    block_rows: int = BLOCK_ROWS, block_columns: int = BLOCK_COLUMNS, warps: int = BACKWARD_WARPS,
    max_row_groups: int = MAX_ROW_GROUPS, stages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d gate, d up, g_low^T @ h) for h = act(gate) * up, from d h (all (M, N); gate and up with contiguous rows,
    `rows_of`) and g_low (M, r): new contiguous tensors in gate's dtype, the last (r, N) summed in float32 and
    rounded once."""
    rows, columns = gate.shape
    rank = grad_low.shape[1]
    if not kernels_run_on(gate) or gate.numel() == 0:
        value, slope = _activation_torch(gate, activation), _slope_torch(gate, activation)
        grad_product = grad_product.float()
        up_float = up.float()
        product = (value * up_float).to(gate.dtype)
        return ((grad_product * up_float * slope).to(gate.dtype), (grad_product * value).to(gate.dtype),
                (grad_low.t().float() @ product.float()).to(gate.dtype))
    grad_low = grad_low.contiguous()
    grad_product = grad_product.contiguous()
    grad_gate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    grad_up = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    groups = max(1, min(max_row_groups, rows // MIN_GROUP_ROWS))
    group_rows = -(-rows // groups)
    group_rows = -(-group_rows // block_rows) * block_rows
    groups = -(-rows // group_rows)
    partials = torch.empty((groups, rank, columns), dtype=torch.float32, device=gate.device)
    rank_block = padded_rank(rank)
    with launching_on(gate):
        _kernels()[1][((columns + block_columns - 1) // block_columns, groups)](
            grad_product, gate, up, grad_low, grad_gate, grad_up, partials, rows, columns, rank, group_rows,
            gate.stride(0), up.stride(0),
            GELU=activation == "gelu_tanh", BLOCK_ROWS=block_rows, BLOCK_COLUMNS=block_columns,
            RANK_BLOCK=rank_block, num_warps=warps, **({} if stages is None else {"num_stages": stages}),
            # float32 inputs, and the interpreter, whose bf16 dot returns garbage (Triton 3.9): the products of the
            # rounded h in float32, exactly what a bf16 dot with float32 accumulation computes.
            DOT_IN_FLOAT32=gate.dtype == torch.float32 or interpreting(),
        )
    return grad_gate, grad_up, summed_partials([partials], gate.dtype)[0]


@torch.library.custom_op("litft::lora_gated_down", mutates_args=())
def lora_gated_down(
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    weights: list[torch.Tensor],
    state: list[torch.Tensor],
    state_counts: list[int],
    mode: str,
    out_features: list[int],
    nested_blocksizes: list[int],
    biases: list[torch.Tensor | None],
    lora_a: torch.Tensor,
    lora_b: list[torch.Tensor],
) -> list[torch.Tensor]:
    """[y, low]: down(act(gate) * up) for one LoRA down projection (the lists hold its one weight, state, bias and
    B, as `lora_projections` takes them), and the adapter's rank-sized input kept for the backward."""
    flat_product = gated_product(rows_of(gate), rows_of(up), activation)  # (M, N)
    product = flat_product.view(*gate.shape[:-1], gate.shape[-1])  # (..., N)
    # Through cuBLAS, reading h back: computing low from the tiles of h inside the product's kernel (row tiles
    # walking groups of columns, partial sums added afterwards) measured slower, 0.27 ms against 0.23 on llama-8b.
    low = flat_product @ lora_a.t()  # (M, r)
    output = projections.kept_or_computed(product, flat_product, low, weights, state, state_counts, mode,
                                          out_features, nested_blocksizes, biases, lora_b, False)
    return [output[0], low]


@lora_gated_down.register_fake
def _(gate, up, activation, weights, state, state_counts, mode, out_features, nested_blocksizes, biases, lora_a,
      lora_b):
    tokens = gate.numel() // gate.shape[-1]
    return [gate.new_empty((*gate.shape[:-1], out_features[0])), gate.new_empty((tokens, lora_a.shape[0]))]


@torch.library.custom_op("litft::lora_gated_down_backward", mutates_args=())
def lora_gated_down_backward(
    grad_output: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    activation: str,
    low: torch.Tensor,
    weights: list[torch.Tensor],
    state: list[torch.Tensor],
    state_counts: list[int],
    mode: str,
    out_features: list[int],
    nested_blocksizes: list[int],
    lora_a: torch.Tensor,
    lora_b: list[torch.Tensor],
) -> list[torch.Tensor]:
    """[grad_gate, grad_up, grad_lora_a, grad_lora_b]."""
    in_features = gate.shape[-1]
    flat_grad = grad_output.reshape(-1, out_features[0])  # (M, out)
    grad_low, grad_updates = projections.update_gradients([flat_grad], lora_b, low)
    grad_product = projections.input_gradient(
        [flat_grad], None, grad_low, weights, state, state_counts, mode, out_features, in_features,
        nested_blocksizes, gate.dtype, lora_a,
    )  # (M, N)
    grad_gate, grad_up, grad_lora_a = gated_backward(grad_product, rows_of(gate), rows_of(up), grad_low, activation)
    return [grad_gate.view(gate.shape), grad_up.view(up.shape), grad_lora_a.to(lora_a.dtype), *grad_updates]


@lora_gated_down_backward.register_fake
def _(grad_output, gate, up, activation, low, weights, state, state_counts, mode, out_features, nested_blocksizes,
      lora_a, lora_b):
    return [gate.new_empty(gate.shape), up.new_empty(up.shape), lora_a.new_empty(lora_a.shape),
            *(update.new_empty(update.shape) for update in lora_b)]


def _setup_context(ctx: Any, inputs: tuple, output: list[torch.Tensor]) -> None:
    (gate, up, activation, weights, state, state_counts, mode, out_features, nested_blocksizes, biases, lora_a,
     lora_b) = inputs
    ctx.save_for_backward(gate, up, output[1], lora_a, *weights, *state, *lora_b)
    ctx.sizes = (len(weights), len(state))
    ctx.bias_gradients = [None] * len(biases) if all(bias is not None for bias in biases) else None
    ctx.arguments = (activation, state_counts, mode, out_features, nested_blocksizes)


def _backward(ctx: Any, grad_outputs: list[torch.Tensor | None]) -> tuple:
    layer_count, state_count = ctx.sizes
    gate, up, low, lora_a, *rest = ctx.saved_tensors
    weights, state, lora_b = rest[:layer_count], rest[layer_count : layer_count + state_count], rest[-layer_count:]
    activation, state_counts, mode, out_features, nested_blocksizes = ctx.arguments
    grad_output = grad_outputs[0]
    if grad_output is None:
        grad_output = torch.zeros((*gate.shape[:-1], out_features[0]), dtype=gate.dtype, device=gate.device)
    grad_gate, grad_up, grad_lora_a, *grad_lora_b = lora_gated_down_backward(
        grad_output, gate, up, activation, low, weights, state, state_counts, mode, out_features, nested_blocksizes,
        lora_a, lora_b,
    )
    return (
        grad_gate, grad_up, None, [None] * layer_count, [None] * state_count, None, None, None, None,
        ctx.bias_gradients, grad_lora_a, grad_lora_b,
    )


lora_gated_down.register_autograd(_backward, setup_context=_setup_context)


def gated_down(gate: torch.Tensor, up: torch.Tensor, down: nn.Module, activation: str) -> torch.Tensor | None:
    """down(act(gate) * up), `activation` "silu" or "gelu_tanh", through the operator above where `down` is a LoRA
    layer it takes; None where it is not (the caller computes it as written)."""
    if not _takes(gate, up, down, activation):
        return None
    gate, up = projections.operator_input(gate), projections.operator_input(up)
    output, _ = lora_gated_down(gate, up, activation, *projections.layer_arguments([down], gate.dtype))
    return output


def _takes(gate: torch.Tensor, up: torch.Tensor, down: nn.Module, activation: str) -> bool:
    return (
        ENABLED
        and activation in ACTIVATIONS
        and projections.computes_together(down)
        and projections.dropout_probability(down) == 0
        and gate.shape == up.shape
        and gate.dtype == up.dtype
        and gate.is_floating_point()
    )
