"""The down projection of a gated MLP, down(act(gate) * up), with its LoRA adapter, in one operator.

Llama's MLP is down(silu(gate) * up); Gemma's gates with GELU (tanh form). Computed as written, with the down
projection in the grouped LoRA operator (`litft.adapters.lora_projections`), the backward needs the product
h = act(gate) * up twice, and h is (tokens x intermediate), the widest activation of the block: for the adapter's
A gradient, d(sA) = g_low^T @ h (g_low = dy @ B, rank-sized), and, through autograd, for the activation's own
gradient. torch.compile keeps gate and up and recomputes h for the first. On an H200, per llama-8b layer and step
(benchmarks/NOTES.md, sections 9 and 16): the recomputation 164 us (read gate and up, write h), the rank-deep GEMM
that reads h back 57 us, then the activation's backward 270 us (read dh, gate, up; write d gate, d up).

Here the activation's backward kernel, which reads gate and up anyway, forms each tile of h in registers and adds
its share of g_low^T @ h to a float32 partial sum: h is neither recomputed into memory nor read back. On Hopper
that work can also ride in the epilogue of the GEMM that sums d h (`lora_gemm.gated_input_gradient`, timed against
this kernel once per kind of call), so that d h itself is neither written nor read back. The kernel
walks a 2-D grid of tiles, (row groups) x (column tiles); each program sums g_low^T @ h over its group of rows and
writes one (rank x columns) partial, and the partials (16 row groups: 2.5% of the bytes the kernel reads at llama's
widths) are summed afterwards, in a fixed order, so the result is the same in every run. The forward takes h from
gate's and up's GEMM where it formed it (`gated_mlp`: `lora_gemm.gated_projections`' tiles hold the same columns of
both), else computes it with the elementwise kernel (`litft.adapters.gated_activation`), then down's GEMMs as the
grouped operator does, including `lora_gemm`'s adapter-in-the-GEMM path.

Numerics: the activation in float32 and h rounded once to the activations' dtype (as inductor's fused kernel
computes it), both in the forward and where the backward forms h again, so the A gradient sees the h the forward
used. Without Triton (CPU, outside the interpreter) the same formulas run as torch operations.

Used where it applies (`gated_mlp` for the whole MLP, `gated_down` from gate and up computed elsewhere): a plain
LoRA down projection that computes together (full-precision or 4-bit base), no adapter dropout, a SiLU or tanh-GELU
gate, gate and up of one shape. Everything else (no adapter, DoRA,
dropout, thunder) runs `down(act(gate) * up)` as before. Under offloaded activation checkpointing the output keeper
is consulted for down's output as the grouped operator does.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from litft.adapters import gated_activation, lora_gemm
from litft.adapters import lora_projections as projections
from litft.adapters.adapter_gradients import padded_rank, summed_partials
from litft.adapters.gated_activation import ACTIVATIONS, gated_product, rows_of
from litft.triton_support import interpreting, kernels_run_on, launching_on

ENABLED = True  # False: every model computes down(act(gate) * up) as written (the benchmarks' A/B)
# False: gate and up through the grouped operator and h formed by the elementwise kernel, as before `gated_mlp` (the
# benchmarks' A/B).
FUSED_PRODUCT = True
# Backward: tiles of (rows x columns), and the row groups whose partial A gradients are summed afterwards. Each
# group is at least MIN_GROUP_ROWS rows, so the partials stay small beside the tiles the kernel reads.
BLOCK_ROWS = 32  # the fastest of a sweep on an H200 at llama-8b's width (NOTES.md, section 16)
BLOCK_COLUMNS = 64
BACKWARD_WARPS = 4
MAX_ROW_GROUPS = 16
MIN_GROUP_ROWS = 512

activation_and_slope = None  # gated_activation.jitted_activation(), a module global once built (see _kernels)


@functools.cache
def _kernels():
    # Built on first use: the interpreter (TRITON_INTERPRET=1, the CPU tests) is chosen when a function is decorated.
    # No triton.language jitted helpers (tl.zeros, tl.cdiv): they are built when triton is imported and would not be
    # interpreted in a process that chose the interpreter later. The kernel calls the activation's jitted function,
    # which Triton resolves through the module's globals.
    global activation_and_slope
    import triton
    import triton.language as tl

    activation_and_slope = gated_activation.jitted_activation()

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

    return gated_backward


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
        value = gated_activation.activation_torch(gate, activation)
        slope = gated_activation.slope_torch(gate, activation)
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
        _kernels()[((columns + block_columns - 1) // block_columns, groups)](
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
    product: torch.Tensor | None,
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
    B, as `lora_projections` takes them), and the adapter's rank-sized input kept for the backward. `product`:
    act(gate) * up formed already (by gate's and up's GEMM, `gated_mlp`), else None; it takes no gradient and is
    not kept (the backward forms h again from gate and up)."""
    if product is None:
        flat_product = gated_product(rows_of(gate), rows_of(up), activation)  # (M, N)
    else:
        flat_product = rows_of(product)
    product = flat_product.view(*gate.shape[:-1], gate.shape[-1])  # (..., N)
    # Through cuBLAS, reading h back: computing low from the tiles of h inside the product's kernel (row tiles
    # walking groups of columns, partial sums added afterwards) measured slower, 0.27 ms against 0.23 on llama-8b.
    low = flat_product @ lora_a.t()  # (M, r)
    output = projections.kept_or_computed(product, flat_product, low, weights, state, state_counts, mode,
                                          out_features, nested_blocksizes, biases, lora_b, False)
    return [output[0], low]


@lora_gated_down.register_fake
def _(gate, up, activation, product, weights, state, state_counts, mode, out_features, nested_blocksizes, biases,
      lora_a, lora_b):
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
    flat_gate, flat_up = rows_of(gate), rows_of(up)
    grad_low, grad_updates = projections.update_gradients([flat_grad], lora_b, low)
    arguments = (weights, state, state_counts, mode, out_features, in_features, nested_blocksizes, gate.dtype)

    def apart() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grad_product = projections.input_gradient([flat_grad], None, grad_low, *arguments, lora_a)  # (M, N)
        return gated_backward(grad_product, flat_gate, flat_up, grad_low, activation)

    # d h summed and the activation's backward done on its tiles in one kernel where that was the faster
    grad_gate, grad_up, grad_lora_a = lora_gemm.gated_input_gradient(
        flat_grad, lambda: next(projections.frozen_weights(*arguments)), grad_low, lora_a, flat_gate, flat_up,
        activation, apart)
    return [grad_gate.view(gate.shape), grad_up.view(up.shape), grad_lora_a.to(lora_a.dtype), *grad_updates]


@lora_gated_down_backward.register_fake
def _(grad_output, gate, up, activation, low, weights, state, state_counts, mode, out_features, nested_blocksizes,
      lora_a, lora_b):
    return [gate.new_empty(gate.shape), up.new_empty(up.shape), lora_a.new_empty(lora_a.shape),
            *(update.new_empty(update.shape) for update in lora_b)]


def _setup_context(ctx: Any, inputs: tuple, output: list[torch.Tensor]) -> None:
    (gate, up, activation, _, weights, state, state_counts, mode, out_features, nested_blocksizes, biases, lora_a,
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
        grad_gate, grad_up, None, None, [None] * layer_count, [None] * state_count, None, None, None, None,
        ctx.bias_gradients, grad_lora_a, grad_lora_b,
    )


lora_gated_down.register_autograd(_backward, setup_context=_setup_context)


def gated_down(gate: torch.Tensor, up: torch.Tensor, down: nn.Module, activation: str) -> torch.Tensor | None:
    """down(act(gate) * up), `activation` "silu" or "gelu_tanh", through the operator above where `down` is a LoRA
    layer it takes; None where it is not (the caller computes it as written)."""
    if not _takes(gate, up, down, activation):
        return None
    gate, up = projections.operator_input(gate), projections.operator_input(up)
    output, _ = lora_gated_down(gate, up, activation, None, *projections.layer_arguments([down], gate.dtype))
    return output


def gated_mlp(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module, activation: str) -> torch.Tensor | None:
    """A gated MLP, down(act(gate(x)) * up(x)), where gate, up and down are LoRA layers that compute together
    (one base storage mode, no dropout, no bias on gate and up, which are not joined): gate and up through the
    grouped operator, which also forms h = act(gate) * up (in their GEMM's kernel where `lora_gemm` takes it), then
    down through the operator above, which reads that h. None where it does not apply: the caller computes gate
    and up (`project`) and then `gated_down`."""
    if not (
        FUSED_PRODUCT and _down_takes(down, activation)
        and projections.computes_together(gate) and projections.computes_together(up)
        and projections.one_group([gate, up]) and projections.dropout_probability(gate) == 0
        and not (gate.joined_base or up.joined_base) and gate.bias is None and up.bias is None
        and gate.out_features == up.out_features and gate.in_features == up.in_features
    ):
        return None
    group_input = projections.operator_input(x)
    gate_out, up_out, product, _ = projections.lora_projections(
        group_input, *projections.layer_arguments([gate, up], group_input.dtype), False, 0.0, activation,
        projections.prepared_update_blocks([gate, up], group_input.dtype))
    output, _ = lora_gated_down(gate_out, up_out, activation, product,
                                *projections.layer_arguments([down], gate_out.dtype))
    return output


def _down_takes(down: nn.Module, activation: str) -> bool:
    """Whether the operator takes `down` with this activation: a LoRA layer that computes together, no dropout."""
    return (
        ENABLED and activation in ACTIVATIONS and projections.computes_together(down)
        and projections.dropout_probability(down) == 0
    )


def _takes(gate: torch.Tensor, up: torch.Tensor, down: nn.Module, activation: str) -> bool:
    return (
        _down_takes(down, activation)
        and gate.shape == up.shape
        and gate.dtype == up.dtype
        and gate.is_floating_point()
    )
