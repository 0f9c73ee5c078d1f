"""LoRA layers that read the same input, computed together in two opaque operators (forward, backward).

q, k and v read one normalized hidden state, gate and up another; o and down are groups of one. For a group
sharing x (tokens M, features K) with frozen weights W_i (N_i, K) and adapters A_i (r_i, K), B_i (N_i, r_i):

    forward    low   = x @ [s_1 A_1; s_2 A_2; ...]^T              one read of x for every adapter      (M, sum r_i)
               y_i   = low_i @ B_i^T   then  y_i += x @ W_i^T     the base GEMM adds into the rank-deep
                                                                  output in its epilogue (beta = 1)
    backward   g_low = [dy_1 @ B_1 | dy_2 @ B_2 | ...]                                                (M, sum r_i)
               d(s A) = g_low^T @ x                               one read of x for every adapter
               dB_i  = dy_i^T @ low_i
               dx    = g_low @ [s_1 A_1; ...]   then  dx += dy_i @ W_i  for each i, in place (beta = 1)

Traced as separate layers, each adapter read x on its own, its output was written and read again by the next
kernel, and each projection's input gradient was its own tensor summed afterwards: per llama-8b layer and step,
about 1.5 GB more memory traffic (benchmarks/NOTES.md, section 8). Here every full-size tensor is written once;
the additions ride in the epilogues of GEMMs that are bound by arithmetic, not by memory.

q, k and v also share one base GEMM (`join_frozen_weights`): their outputs come side by side in one tensor
y = [y_1 | y_2 | y_3] = low @ diag(B_1, B_2, B_3)^T + x @ [W_1; W_2; W_3]^T, and dx takes one GEMM over all three,
dy @ [W_1; W_2; W_3]. Full-precision weights lie back to back in one storage for it (each layer's `weight` stays its
own parameter, a view into it); 4-bit weights dequantize into one buffer. k's and v's input gradients alone reduce
over 1024 columns, where cuBLAS runs well below its rate (NOTES.md, section 11). Weights that no longer lie back to
back (sharded by FSDP2) take one GEMM each, into their columns of y.

Under offloaded activation checkpointing a keeper (`keeping_outputs`) may hold on to the outputs of the groups that
widen a token little (o, down, grouped-query q/k/v) from the block's forward, and hand them back when the backward
recomputes the block: those base GEMMs (46% of a llama-8b block's) are not run twice.

A gated MLP's gate and up (`activation`) also return h = act(gate) * up for the down projection: their frozen weights
lie back to back too (unmarked, two GEMMs' worth of columns), and `lora_gemm.gated_projections` computes both in one
kernel whose tiles hold the same columns of each, forming h in registers.

With adapter dropout each adapter reads x through a mask of its own (`litft.adapters.lora_dropout`): low is then one
rank-deep GEMM per adapter over its masked copy of x, and the backward draws the masks again from the forward's seed
rather than keeping them.

The operators are opaque to torch.compile (custom operators, like the dequantizing matmul of a quantized base):
traced, inductor lowers an addmm into a copy of its addend plus a GEMM. Quantized 4-bit bases dequantize inside
them, forward and backward, so nothing full-precision is kept between the two. The Hugging Face parameter names
stay where they are: only the arithmetic is grouped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from litft.adapters import lora_dropout, lora_gemm
from litft.adapters.adapter_gradients import adapter_gradients
from litft.adapters.gated_activation import gated_product
from litft.adapters.quantization import dequantize_weight


class OutputKeeper(Protocol):
    """Offloaded activation checkpointing (`litft.training.strategies.OffloadedBlocks`) keeps some of a block's
    projection outputs from its forward and hands them back when the backward runs the block again, so the
    recomputation skips those base GEMMs. The operator asks, call by call, in the same order both times."""

    def keeps(self, out_width: int, in_width: int) -> bool:
        """Whether a group reading `in_width` features and writing `out_width` has its outputs kept."""

    def take(self, shapes: list[tuple[int, ...]]) -> list[torch.Tensor] | None:
        """While recomputing: this call's outputs, as kept by the forward (None: they were not kept, compute them).
        During the forward: None."""

    def keep(self, outputs: list[torch.Tensor]) -> None:
        """During the forward: keep this call's outputs (not called while recomputing)."""


_output_keeper: OutputKeeper | None = None
# dy_i @ B_i and dy_i^T @ low_i from one read of dy_i (`litft.adapters.adapter_gradients`); False: two cuBLAS GEMMs
# (the benchmarks' A/B).
FUSED_ADAPTER_GRADIENTS = True


@contextlib.contextmanager
def keeping_outputs(keeper: OutputKeeper | None) -> Iterator[None]:
    """Runs the operators below with `keeper` consulted (read when they run, also inside a compiled block: the
    operators are opaque to the compiler, so nothing is traced or guarded on it)."""
    global _output_keeper
    previous, _output_keeper = _output_keeper, keeper
    try:
        yield
    finally:
        _output_keeper = previous


def _layer_states(state: list[torch.Tensor], state_counts: list[int]) -> list[list[torch.Tensor]]:
    """The flat list of quantization state tensors, split into each layer's own."""
    states, start = [], 0
    for count in state_counts:
        states.append(state[start : start + count])
        start += count
    return states


def frozen_weights(
    weights: list[torch.Tensor], state: list[torch.Tensor], state_counts: list[int], mode: str,
    out_features: list[int], in_features: int, nested_blocksizes: list[int], dtype: torch.dtype,
):
    """Yields each layer's frozen weight (N_i, K) in `dtype`, dequantized transiently if it is stored quantized."""
    for weight, layer_state, size, nested_blocksize in zip(
        weights, _layer_states(state, state_counts), out_features, nested_blocksizes
    ):
        if mode == "none":
            yield weight if weight.dtype == dtype else weight.to(dtype)
        else:
            yield dequantize_weight(weight, layer_state, mode, size, in_features, nested_blocksize, dtype)


def back_to_back(weights: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The weights (N_i, K) as one (sum N_i, K) matrix without a copy when they lie back to back in one storage, in
    order, contiguous and of one dtype (as `join_frozen_weights` lays them out); else None."""
    first = weights[0]
    offset = first.storage_offset()
    for weight in weights:
        if (
            weight.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or weight.storage_offset() != offset
            or not weight.is_contiguous()
            or weight.dtype != first.dtype
            or weight.shape[1:] != first.shape[1:]
        ):
            return None
        offset += weight.numel()
    return first.as_strided((sum(weight.shape[0] for weight in weights), first.shape[1]), (first.shape[1], 1))


def _joined_weight(
    weights: list[torch.Tensor], state: list[torch.Tensor], state_counts: list[int], mode: str,
    out_features: list[int], in_features: int, nested_blocksizes: list[int], dtype: torch.dtype,
) -> torch.Tensor | None:
    """Every layer's frozen weight in one (sum N_i, K) matrix in `dtype` where that costs no copy of a weight: a
    quantized group dequantizes into one buffer (one layer's rows after another's); full-precision weights join
    when they lie back to back already. None: one GEMM per layer."""
    if mode == "none":
        joined = back_to_back(weights)
        return joined if joined is not None and joined.dtype == dtype else None
    joined = torch.empty((sum(out_features), in_features), dtype=dtype, device=weights[0].device)
    for weight, layer_state, rows, nested_blocksize in zip(
        weights, _layer_states(state, state_counts), joined.split(out_features), nested_blocksizes
    ):
        dequantize_weight(weight, layer_state, mode, rows.shape[0], in_features, nested_blocksize, dtype, out=rows)
    return joined


@torch.library.custom_op("litft::lora_projections", mutates_args=())
def lora_projections(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    state: list[torch.Tensor],
    state_counts: list[int],
    mode: str,
    out_features: list[int],
    nested_blocksizes: list[int],
    biases: list[torch.Tensor | None],
    lora_a: torch.Tensor,
    lora_b: list[torch.Tensor],
    joined: bool,
    dropout: float,
    activation: str,
    update_blocks: torch.Tensor | None,
) -> list[torch.Tensor]:
    """[y_1, ..., y_n, low]: each layer's output (..., N_i) and the adapters' shared rank-sized input (M, sum r_i),
    kept for the backward; `joined`: [y, low], the outputs side by side in one tensor (..., sum N_i), from one base
    GEMM when the weights join. `activation` ("silu", "gelu_tanh"; else ""): the group is a gated MLP's gate and
    up, and the outputs are [gate, up, h, low] with h = act(gate) * up, which the down projection reads
    (`lora_gemm.gated_projections` forms it with gate and up; it takes no gradient). `lora_a` is the layers' A
    factors, each times its scaling, stacked (sum r_i, K), in x's dtype: the scalings ride in the kernel that stacks
    and casts them, not in kernels of their own.

    `dropout` > 0: each adapter reads x through a dropout mask of its own, and the outputs end with the seed the
    masks were drawn from (a host int64 tensor (1,), see `litft.adapters.lora_dropout`), from which the backward
    draws them again. `update_blocks`: diag(B_1, ..., B_n) (sum N_i, sum r_i) as the block's call prepared it
    (`litft.adapters.adapter_copies`), which the joined and gated GEMMs read; None: formed here."""
    in_features = x.shape[-1]
    flat_x = x.reshape(-1, in_features)  # (M, K)
    seed = []
    if dropout > 0:
        # Drawn from the host generator: no wait for the device, and a recomputation that restores the RNG state
        # (activation checkpointing) draws the same seed, hence the same masks.
        seed = [torch.randint(2**31 - 2**10, (1,), dtype=torch.int64)]  # adapter i draws from seed + i
        ranks = [update.shape[1] for update in lora_b]
        low = torch.cat([
            lora_dropout.masked_input(flat_x, int(seed[0]) + index, dropout) @ (a / (1 - dropout)).t()
            for index, a in enumerate(lora_a.split(ranks))
        ], dim=1)
    else:
        low = flat_x @ lora_a.t()  # (M, sum r_i)
    if activation:
        outputs = _gated(x, flat_x, low, weights, state, state_counts, mode, out_features, nested_blocksizes, biases,
                         lora_b, activation, update_blocks)
    else:
        outputs = kept_or_computed(x, flat_x, low, weights, state, state_counts, mode, out_features,
                                   nested_blocksizes, biases, lora_b, joined, update_blocks)
    return [*outputs, low, *seed]


def kept_or_computed(
    x: torch.Tensor, flat_x: torch.Tensor, low: torch.Tensor, weights: list[torch.Tensor], state: list[torch.Tensor],
    state_counts: list[int], mode: str, out_features: list[int], nested_blocksizes: list[int],
    biases: list[torch.Tensor | None], lora_b: list[torch.Tensor], joined: bool,
    update_blocks: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The group's outputs (`_base_and_updates`), through the output keeper where one keeps this group's: handed
    back while the backward recomputes the block, kept during its forward."""
    arguments = (x, flat_x, low, weights, state, state_counts, mode, out_features, nested_blocksizes, biases, lora_b,
                 joined, update_blocks)
    keeper = _output_keeper
    if keeper is None or not keeper.keeps(sum(out_features), x.shape[-1]):
        return _base_and_updates(*arguments)
    sizes = [sum(out_features)] if joined else out_features
    kept = keeper.take([(*x.shape[:-1], size) for size in sizes])
    if kept is None:
        kept = _base_and_updates(*arguments)
        keeper.keep(kept)
    return kept


def _base_and_updates(
    x: torch.Tensor, flat_x: torch.Tensor, low: torch.Tensor, weights: list[torch.Tensor], state: list[torch.Tensor],
    state_counts: list[int], mode: str, out_features: list[int], nested_blocksizes: list[int],
    biases: list[torch.Tensor | None], lora_b: list[torch.Tensor], joined: bool,
    update_blocks: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """The outputs of `lora_projections` without `low`: one tensor when `joined`, else one per layer. Without
    biases each output is x @ W^T + low_i @ B_i^T in one GEMM where `lora_gemm` finds that faster than cuBLAS's
    two (the update, then the base GEMM adding into it in place)."""
    in_features = x.shape[-1]
    arguments = (weights, state, state_counts, mode, out_features, in_features, nested_blocksizes, x.dtype)
    no_bias = all(bias is None for bias in biases)
    if joined:
        # diag(B_1, B_2, ...): every adapter's up-projection in one GEMM, each column reading only its own layer's
        # rank-sized input (the zeros add nothing).
        updates = torch.block_diag(*lora_b) if update_blocks is None else update_blocks  # (sum N_i, sum r_i)
        weight = _joined_weight(*arguments)
        if no_bias and weight is not None:
            def cublas() -> torch.Tensor:
                return (low @ updates.t()).addmm_(flat_x, weight.t())  # (M, sum N_i)

            output = lora_gemm.sum_of_products([(flat_x, weight), (low, updates)], transposed=True, cublas=cublas)
            return [output.view(*x.shape[:-1], output.shape[-1])]
        if no_bias:
            output = low @ updates.t()  # (M, sum N_i)
        else:
            bias = torch.cat(
                [x.new_zeros(size) if bias is None else bias.to(x.dtype) for bias, size in zip(biases, out_features)]
            )
            output = torch.addmm(bias, low, updates.t())
        if weight is not None:
            output.addmm_(flat_x, weight.t())
        else:  # the weights no longer lie back to back (moved since joining): each into its columns, in place
            for columns, weight in zip(output.split(out_features, dim=1), frozen_weights(*arguments)):
                columns.addmm_(flat_x, weight.t())
        return [output.view(*x.shape[:-1], output.shape[-1])]
    return [output.view(*x.shape[:-1], output.shape[1])
            for output in _one_by_one(flat_x, low, frozen_weights(*arguments), biases, lora_b)]


def _one_by_one(
    flat_x: torch.Tensor, low: torch.Tensor, weights: Iterable[torch.Tensor], biases: list[torch.Tensor | None],
    lora_b: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Each layer's output (M, N_i) = x @ W_i^T + low_i @ B_i^T (+ its bias), one base GEMM each."""
    outputs = []
    start = 0
    for weight, bias, update in zip(weights, biases, lora_b):
        rank = update.shape[1]
        low_i = low[:, start : start + rank]
        start += rank
        if bias is None:
            def cublas(weight=weight, low_i=low_i, update=update) -> torch.Tensor:
                return (low_i @ update.t()).addmm_(flat_x, weight.t())  # (M, N_i)

            output = lora_gemm.sum_of_products([(flat_x, weight), (low_i, update)], transposed=True, cublas=cublas)
        else:
            output = torch.addmm(bias.to(flat_x.dtype), low_i, update.t()).addmm_(flat_x, weight.t())
        outputs.append(output)
    return outputs


def _gated(
    x: torch.Tensor, flat_x: torch.Tensor, low: torch.Tensor, weights: list[torch.Tensor], state: list[torch.Tensor],
    state_counts: list[int], mode: str, out_features: list[int], nested_blocksizes: list[int],
    biases: list[torch.Tensor | None], lora_b: list[torch.Tensor], activation: str,
    update_blocks: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """[gate, up, act(gate) * up] (..., N) each, for a group of two layers, gate's and up's. The output keeper is
    not consulted: it keeps outputs that widen a token little, and gate and up widen it most."""
    arguments = (weights, state, state_counts, mode, out_features, x.shape[-1], nested_blocksizes, x.dtype)
    # Gate's and up's frozen weights back to back, [W_gate; W_up], for the kernel that computes both: as laid out by
    # `join_frozen_weights`, or dequantized into one buffer.
    joined = _joined_weight(*arguments) if all(bias is None for bias in biases) else None

    def separately() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        both = joined.split(out_features) if joined is not None else frozen_weights(*arguments)
        gate, up = _one_by_one(flat_x, low, both, biases, lora_b)
        return gate, up, gated_product(gate, up, activation)

    if joined is None:
        outputs = separately()
    else:
        outputs = lora_gemm.gated_projections(flat_x, joined, low, tuple(lora_b), activation, separately,
                                              update_blocks)
    return [output.view(*x.shape[:-1], output.shape[1]) for output in outputs]


@lora_projections.register_fake
def _(x, weights, state, state_counts, mode, out_features, nested_blocksizes, biases, lora_a, lora_b, joined, dropout,
      activation, update_blocks):
    tokens = x.numel() // x.shape[-1]
    sizes = [sum(out_features)] if joined else out_features
    if activation:  # [gate, up, h, low]
        sizes = [*sizes, out_features[0]]
    seed = [torch.empty(1, dtype=torch.int64)] if dropout > 0 else []
    return [*(x.new_empty((*x.shape[:-1], size)) for size in sizes), x.new_empty((tokens, lora_a.shape[0])), *seed]


@torch.library.custom_op("litft::lora_projections_backward", mutates_args=())
def lora_projections_backward(
    grad_outputs: list[torch.Tensor],
    x: torch.Tensor,
    low: torch.Tensor,
    weights: list[torch.Tensor],
    state: list[torch.Tensor],
    state_counts: list[int],
    mode: str,
    out_features: list[int],
    nested_blocksizes: list[int],
    lora_a: torch.Tensor,
    lora_b: list[torch.Tensor],
    input_grad: bool,
    dropout: float,
    seed: torch.Tensor | None,
) -> list[torch.Tensor]:
    """[grad_x (empty when not `input_grad`), grad_lora_a, grad_lora_b_1, ..., grad_lora_b_n]; `grad_outputs` is one
    tensor per layer, or one for all side by side (the joined forward's output). With `dropout`, the forward's masks
    are drawn again from its `seed`."""
    in_features = x.shape[-1]
    flat_x = x.reshape(-1, in_features)  # (M, K)
    if len(grad_outputs) == 1 and len(out_features) > 1:  # joined: each layer's gradient is a block of columns
        joined_grad = grad_outputs[0].reshape(-1, sum(out_features))  # (M, sum N_i)
        flat_grads = joined_grad.split(out_features, dim=1)
    else:
        joined_grad = None
        flat_grads = [grad.reshape(-1, size) for grad, size in zip(grad_outputs, out_features)]  # (M, N_i) each
    grad_low, grad_updates = update_gradients(flat_grads, lora_b, low)
    lora_grad_x = None
    if dropout > 0:
        grad_lora_a, lora_grad_x = _dropped_gradients(flat_x, grad_low, lora_a, lora_b, dropout, int(seed), input_grad)
    else:
        grad_lora_a = grad_low.t() @ flat_x  # (sum r_i, K)
    if input_grad:
        grad_x = input_gradient(
            flat_grads, joined_grad, grad_low, weights, state, state_counts, mode, out_features, in_features,
            nested_blocksizes, x.dtype, lora_a, lora_grad_x,
        ).view(x.shape)
    else:
        grad_x = x.new_empty(0)
    return [grad_x, grad_lora_a, *grad_updates]


def update_gradients(
    flat_grads: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], low: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """g_low = [dy_1 @ B_1 | dy_2 @ B_2 | ...] (M, sum r_i) and each dB_i = dy_i^T @ low_i, from the layers' output
    gradients dy_i (M, N_i)."""
    grad_low_parts, grad_updates = [], []
    start = 0
    for grad, update in zip(flat_grads, lora_b):
        rank = update.shape[1]
        if FUSED_ADAPTER_GRADIENTS:  # both from one read of dy_i where a kernel runs
            grad_low_i, grad_update = adapter_gradients(grad, update, low[:, start : start + rank])
        else:
            grad_low_i, grad_update = grad @ update, grad.t() @ low[:, start : start + rank]
        grad_low_parts.append(grad_low_i)  # (M, r_i)
        grad_updates.append(grad_update)  # (N_i, r_i)
        start += rank
    grad_low = torch.cat(grad_low_parts, dim=1) if len(grad_low_parts) > 1 else grad_low_parts[0]  # (M, sum r_i)
    return grad_low, grad_updates


def input_gradient(
    flat_grads: Sequence[torch.Tensor], joined_grad: torch.Tensor | None, grad_low: torch.Tensor,
    weights: list[torch.Tensor], state: list[torch.Tensor], state_counts: list[int], mode: str,
    out_features: list[int], in_features: int, nested_blocksizes: list[int], dtype: torch.dtype,
    lora_a: torch.Tensor, lora_grad_x: torch.Tensor | None = None,
) -> torch.Tensor:
    """dx (M, K) = g_low @ (sA) + sum_i dy_i @ W_i, each base GEMM adding in place; `lora_grad_x`: the adapters'
    share computed already (through dropout masks), which the base GEMMs then add into."""
    arguments = (weights, state, state_counts, mode, out_features, in_features, nested_blocksizes, dtype)
    weight = _joined_weight(*arguments) if joined_grad is not None else None
    # Every layer's frozen weight at once (a quantized group dequantizes them all before the GEMMs).
    pairs = [(joined_grad, weight)] if weight is not None else list(zip(flat_grads, frozen_weights(*arguments)))

    def through_frozen_weights(grad_x: torch.Tensor) -> torch.Tensor:  # (M, K), each base GEMM adding in place
        for grad, frozen in pairs:
            grad_x.addmm_(grad, frozen)
        return grad_x

    if lora_grad_x is not None:
        return through_frozen_weights(lora_grad_x)
    return lora_gemm.sum_of_products(
        [*pairs, (grad_low, lora_a)], transposed=False, cublas=lambda: through_frozen_weights(grad_low @ lora_a)
    )


def _dropped_gradients(
    flat_x: torch.Tensor, grad_low: torch.Tensor, lora_a: torch.Tensor, lora_b: list[torch.Tensor], dropout: float,
    seed: int, input_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A's gradient and the adapters' share of x's gradient when each adapter read x through its own mask:
    low_i = (x * m_i) @ (A_i / (1 - p))^T, so d(A_i) = g_i^T @ (x * m_i) / (1 - p) and
    dx = sum_i (g_i @ A_i) * m_i / (1 - p), one mask alive at a time."""
    ranks = [update.shape[1] for update in lora_b]
    rescale = 1 / (1 - dropout)
    grad_a_parts, grad_x = [], None
    for index, (a, grad) in enumerate(zip(lora_a.split(ranks), grad_low.split(ranks, dim=1))):
        grad_a_parts.append((grad.t() @ lora_dropout.masked_input(flat_x, seed + index, dropout)) * rescale)  # (r_i, K)
        if input_grad:
            grad_x = lora_dropout.add_masked(grad_x, grad @ a, seed + index, dropout, rescale)  # (M, K)
    return torch.cat(grad_a_parts), grad_x


@lora_projections_backward.register_fake
def _(grad_outputs, x, low, weights, state, state_counts, mode, out_features, nested_blocksizes, lora_a, lora_b,
      input_grad, dropout, seed):
    grad_x = x.new_empty(x.shape) if input_grad else x.new_empty(0)
    return [grad_x, lora_a.new_empty(lora_a.shape), *(update.new_empty(update.shape) for update in lora_b)]


def _setup_context(ctx: Any, inputs: tuple, output: list[torch.Tensor]) -> None:
    (x, weights, state, state_counts, mode, out_features, nested_blocksizes, biases, lora_a, lora_b, joined, dropout,
     activation, _) = inputs
    output_count = 1 if joined else len(out_features)
    if activation:  # [gate, up, h, low]: h takes no gradient (the down operator's backward forms its own)
        ctx.mark_non_differentiable(output[output_count])
        output_count += 1
    seed = output[output_count + 1] if dropout > 0 else None  # the outputs are [y..., low, seed]
    ctx.save_for_backward(x, output[output_count], seed, lora_a, *weights, *state, *lora_b)
    ctx.dropout = dropout
    ctx.sizes = (len(weights), len(state))
    # The gradient mirrors the input's structure, which counts the biases as a list only if every entry is a tensor.
    ctx.bias_gradients = [None] * len(biases) if all(bias is not None for bias in biases) else None
    ctx.arguments = (state_counts, mode, out_features, nested_blocksizes)
    ctx.joined = joined


def _backward(ctx: Any, grad_outputs: list[torch.Tensor | None]) -> tuple:
    layer_count, state_count = ctx.sizes
    x, low, seed, lora_a, *rest = ctx.saved_tensors
    weights, state, lora_b = rest[:layer_count], rest[layer_count : layer_count + state_count], rest[-layer_count:]
    state_counts, mode, out_features, nested_blocksizes = ctx.arguments
    sizes = [sum(out_features)] if ctx.joined else out_features  # joined: the outputs are [y, low]
    grads = [
        torch.zeros((*x.shape[:-1], size), dtype=x.dtype, device=x.device) if grad is None else grad
        for grad, size in zip(grad_outputs[: len(sizes)], sizes)
    ]
    input_grad = ctx.needs_input_grad[0]
    grad_x, grad_lora_a, *grad_lora_b = lora_projections_backward(
        grads, x, low, weights, state, state_counts, mode, out_features, nested_blocksizes, lora_a, lora_b, input_grad,
        ctx.dropout, seed,
    )
    # One entry per input, a list where the input is a list of tensors (frozen weights and state, biases, B).
    return (
        grad_x if input_grad else None, [None] * layer_count, [None] * state_count, None, None, None, None,
        ctx.bias_gradients, grad_lora_a, grad_lora_b, None, None, None, None,
    )


lora_projections.register_autograd(_backward, setup_context=_setup_context)


def computes_together(layer: nn.Module) -> bool:
    """Whether `layer` is a LoRA layer these operators compute: plain LoRA / rsLoRA (not DoRA), with or without
    adapter dropout, adapters switched on, a full-precision or 4-bit base (a float8 base has its own operator), not
    under thunder (which cannot trace custom operators). Only a `LoRALinear` has `compute_together`."""
    if not getattr(layer, "compute_together", False) or layer.use_dora or layer.lora_A is None:
        return False
    if "forward" in vars(layer):  # see adapters_disabled
        return False
    return layer.quantization is None or layer.quantization.mode != "fp8"


def dropout_probability(layer: nn.Module) -> float:
    """The adapter dropout a layer applies now: its probability while training, 0 in evaluation or without one."""
    dropout = layer.lora_dropout
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def forward_together(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor] | None:
    """The outputs of `layers` that all read `x`: the LoRA layers among them computed together, any other layer
    (a linear layer left out of --lora.targets, a DoRA layer, ...) called on its own. None when none can join (the
    caller then calls each layer)."""
    can_join = [computes_together(layer) for layer in layers]
    joining = [layer for layer, joins in zip(layers, can_join) if joins]
    if not joining or not one_group(joining):
        return None
    # One base GEMM for the group where `join_frozen_weights` marked it (the flag is fixed per layer, so a compiled
    # block specializes on it once; whether the weights still lie back to back is the operator's to check).
    joined = len(joining) > 1 and all(layer.joined_base for layer in joining)
    outputs = _computed(x, joining, joined)
    if joined:  # views of the one output tensor
        outputs = outputs[0].split([layer.out_features for layer in joining], dim=-1)
    else:  # the outputs end with low (and the dropout seed)
        outputs = outputs[: len(joining)]
    # By position, never by id(): a compiled block would guard on each module's identity and recompile per block.
    outputs = iter(outputs)
    return [next(outputs) if joins else layer(x) for layer, joins in zip(layers, can_join)]


def forward_joined(x: torch.Tensor, layers: Sequence[nn.Module]) -> torch.Tensor | None:
    """The outputs of `layers` side by side in one tensor (..., sum of out_features), where all of them compute
    together through one base GEMM (q, k, v once `join_frozen_weights` joined them); None otherwise."""
    if len(layers) < 2 or not all(computes_together(layer) and layer.joined_base for layer in layers) \
            or not one_group(layers):
        return None
    return _computed(x, layers, True)[0]


def one_group(layers: Sequence[nn.Module]) -> bool:
    """Whether LoRA layers that compute together can share one operator call: one base storage mode, one dropout."""
    modes = {"none" if layer.quantization is None else layer.quantization.mode for layer in layers}
    return len(modes) == 1 and len({dropout_probability(layer) for layer in layers}) == 1


def _computed(x: torch.Tensor, layers: Sequence[nn.Module], joined: bool) -> list[torch.Tensor]:
    group_input = operator_input(x)
    return lora_projections(group_input, *layer_arguments(layers, group_input.dtype), joined,
                            dropout_probability(layers[0]), "", prepared_update_blocks(layers, group_input.dtype))


def operator_input(x: torch.Tensor) -> torch.Tensor:
    """x as the LoRA operators take it. Autocast does not reach into custom operators: cast the input as it would
    cast F.linear's, and everything below (weights, adapters, output) follows its dtype, as autocast's F.linear
    would compute."""
    return x.to(operator_dtype(x)) if x.is_floating_point() else x


def operator_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the LoRA operators compute in for a floating-point input `x`: autocast's where it is on."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def layer_arguments(layers: Sequence[nn.Module], dtype: torch.dtype) -> tuple:
    """What the LoRA operators take of `layers` (computing together, one base storage mode): weights, quantization
    state and its count per layer, the mode, out_features, nested block sizes, biases, the stacked A factors and
    each B, the adapters in the activations' `dtype`."""
    weights, state, state_counts = [], [], []
    for layer in layers:
        weights.append(layer.weight)
        if layer.quantization is not None:
            layer_state = layer.quantization.state_tensors(layer)
            state.extend(layer_state)
            state_counts.append(len(layer_state))
        else:
            state_counts.append(0)
    mode = "none" if layers[0].quantization is None else layers[0].quantization.mode
    return (
        weights, state, state_counts, mode, [layer.out_features for layer in layers],
        [getattr(layer, "nested_blocksize", None) or 0 for layer in layers], [layer.bias for layer in layers],
        *adapters_in(layers, dtype),
    )


def adapters_in(layers: Sequence[nn.Module], dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The layers' stacked A factors, each times its scaling (sum r_i, K), and each B (N_i, r_i), in `dtype`: the
    copies that the block's call prepared for exactly this group (`litft.adapters.adapter_copies`), else cast here."""
    prepared_a = layers[0].prepared_lora_a
    if prepared_a is not None and prepared_a.dtype == dtype and _prepared_for(layers):
        return prepared_a, [layer.prepared_lora_b for layer in layers]
    # The adapters compute in the activations' dtype, as a single LoRALinear does (see its forward); A carries the
    # scaling (s B A x = B (s A) x), so autograd scales A's gradient in the same kernel that casts it back.
    lora_a = torch.cat([layer.lora_A.weight * layer.scaling for layer in layers]).to(dtype)  # (sum r_i, K)
    return lora_a, [layer.lora_B.weight.to(dtype) for layer in layers]


def prepared_update_blocks(layers: Sequence[nn.Module], dtype: torch.dtype) -> torch.Tensor | None:
    """diag(B_1, ..., B_n) in `dtype` as the block's call prepared it for exactly this group, else None."""
    blocks = layers[0].prepared_update_blocks
    return blocks if blocks is not None and blocks.dtype == dtype and _prepared_for(layers) else None


def _prepared_for(layers: Sequence[nn.Module]) -> bool:
    """Whether the block's call prepared copies for a group of exactly these layers, in this order (each knows its
    place; the check reads no module identity, which a compiled block would guard on per block)."""
    size = len(layers)
    return all(layer.prepared_group == (position, size) and layer.prepared_lora_b is not None
               for position, layer in enumerate(layers))


# The layers of a model's `project` call whose base weights join into one GEMM, by module name. Only q/k/v: one
# GEMM saves 0.10 ms per llama-8b layer there (k's and v's input gradients reduce over 1024 columns only), while
# gate/up's 28672-wide GEMM ran 8% slower than its two halves on an H200 (benchmarks/NOTES.md, section 11).
JOINED_GROUPS = (("q_proj", "k_proj", "v_proj"),)
# The layers whose full-precision weights lie back to back in one storage without being marked to run one base
# GEMM: a gated MLP's gate and up, which `lora_gemm.gated_projections` reads as one (2N, K) operand.
BACK_TO_BACK_GROUPS = (("gate_proj", "up_proj"),)


@torch.no_grad()
def join_frozen_weights(model: nn.Module) -> int:
    """Marks each q/k/v group of LoRA layers to run one base GEMM, and lays their frozen full-precision weights back
    to back in one storage for it (4-bit weights stay where they are: they dequantize into one buffer); lays gate's
    and up's back to back too, unmarked (`BACK_TO_BACK_GROUPS`). Each layer's `weight` stays its own parameter
    under its own name, with its own shape and values: a view into the group's storage. Returns how many groups it
    marked. A mixture's experts go back to back first, all of them in one storage per projection kind
    (`litft.adapters.lora_experts`)."""
    from litft.adapters.lora_experts import lay_experts_back_to_back

    lay_experts_back_to_back(model)
    joined = 0
    for module in model.modules():
        for names in BACK_TO_BACK_GROUPS:
            layers = _lora_group(module, names)
            if layers is not None:
                _lay_back_to_back(layers)
        for names in JOINED_GROUPS:
            layers = _lora_group(module, names)
            if layers is None or all(layer.joined_base for layer in layers) or not _lay_back_to_back(layers):
                continue
            for layer in layers:
                layer.joined_base = True
            joined += 1
    return joined


def _lora_group(module: nn.Module, names: Sequence[str]) -> list[nn.Module] | None:
    """`module`'s layers of these names where every one is a LoRA layer that computes together, else None."""
    layers = [getattr(module, name, None) for name in names]
    return layers if all(isinstance(layer, nn.Module) and computes_together(layer) for layer in layers) else None


def _lay_back_to_back(layers: list[nn.Module]) -> bool:
    """Lays the layers' frozen full-precision weights back to back in one storage, each `weight` a view into it
    (4-bit weights stay where they are); False where they cannot join (trainable or meta weights, mixed storage
    modes, dtypes, devices or input widths)."""
    weights = [layer.weight for layer in layers]
    if any(weight.requires_grad or weight.is_meta for weight in weights):
        return False
    if len({layer.quantization.mode if layer.quantization else "none" for layer in layers}) > 1:
        return False
    if layers[0].quantization is None and back_to_back(weights) is None:
        if len({(weight.dtype, weight.device, weight.shape[1:]) for weight in weights}) > 1:
            return False
        storage = torch.cat(weights)  # (sum N_i, K)
        start = 0
        for layer, weight in zip(layers, weights):
            layer.weight = nn.Parameter(storage[start : start + weight.shape[0]], requires_grad=False)
            start += weight.shape[0]
    return True
