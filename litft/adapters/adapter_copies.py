"""A decoder block's LoRA adapters in the activations' dtype, cast once per block call for all its layers.

The adapters train in float32 (`litft.adapters.lora.ADAPTER_DTYPE`) and compute in the activations' dtype. Cast
where each grouped operator reads them, that is one small kernel per factor and layer in the forward, the same
again where the backward casts them anew, and one per gradient on its way back to float32: about 30 kernels of a
few microseconds per llama-8b block and step, ~1,000 per step, each followed by a gap (benchmarks/NOTES.md,
sections 20-21: under the GPU's power limit such time still costs ~0.6 of its length).

`BlockAdapterCopies` wraps a block's forward, outside the compiled graph (torch.compile's `compile_blocks` installs
it around the compiled forward, inside any activation checkpoint, so a recomputation prepares its own copies):

    forward    copies = cat(s A_q, s A_k, s A_v, s A_o, ..., B_q, ..., B_down) in the activations' dtype
               three kernels for the whole block, and two more that lay diag(B_q, B_k, B_v) and diag(B_gate, B_up)
               for the GEMMs that read them; each layer reads views (`prepared_lora_a` and
               `prepared_update_blocks` on the first layer of a group that computes together, stacked as the
               group's operator takes them; `prepared_lora_b` on every layer)
    backward   the copies' gradients, one concatenation cast to float32 and scaled: three kernels, whose views
               are the parameters' gradients

The values are those of the per-operator casts, bit for bit (s A is formed in float32 and rounded once, the
gradients are cast before they are scaled), so a block computes the same with or without this wrapper. The copies
are set on the layers for the call only: a layer called outside a wrapped block casts its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from litft.adapters.lora_projections import BACK_TO_BACK_GROUPS, JOINED_GROUPS, computes_together, operator_dtype

# False: every operator casts its own adapters (the benchmarks' A/B).
ENABLED = True
# The layers that the models compute together, by name under one parent module: their A factors are stacked in one
# copy, as the grouped operator takes them (q/k/v; a gated MLP's gate and up).
GROUPS = (*JOINED_GROUPS, *BACK_TO_BACK_GROUPS)


class _AdapterCopies(torch.autograd.Function):
    """float32 parameters [A_1, ..., A_n, B_1, ..., B_n] -> their copies in `dtype`, A_i scaled by s_i, as views of
    one tensor shaped `shapes` (several A factors may form one view: a group's stacked A); then, not differentiable,
    the B copies of the grouped layers (the first B copies) laid into zeros at `block_positions`, viewed as
    `block_shapes` (each group's diag(B_1, ..., B_n))."""

    @staticmethod
    def forward(ctx: Any, dtype: torch.dtype, scaled: list[tuple[int, int, float]], shapes: list[tuple[int, ...]],
                block_positions: torch.Tensor | None, block_shapes: list[tuple[int, int]],
                *parameters: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat = torch.cat([parameter.reshape(-1) for parameter in parameters])  # float32, a new tensor
        for start, end, scaling in scaled:
            flat[start:end].mul_(scaling)
        copies = flat.to(dtype)
        pieces = [piece.view(shape) for piece, shape in zip(copies.split([math.prod(s) for s in shapes]), shapes)]
        blocks = []
        if block_positions is not None:
            a_size = scaled[-1][1]
            laid = copies.new_zeros(sum(math.prod(shape) for shape in block_shapes))
            laid.index_copy_(0, block_positions, copies[a_size : a_size + block_positions.numel()])
            blocks = [piece.view(shape) for piece, shape in
                      zip(laid.split([math.prod(shape) for shape in block_shapes]), block_shapes)]
            ctx.mark_non_differentiable(*blocks)
        ctx.set_materialize_grads(False)  # no zeros for the blocks' (absent) gradients
        ctx.scaled = scaled
        ctx.copy_shapes = shapes
        ctx.parameter_shapes = [parameter.shape for parameter in parameters]
        ctx.parameter_dtype = flat.dtype
        return (*pieces, *blocks)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        reference = next(grad for grad in grads if grad is not None)
        flat = torch.cat([
            (grad if grad is not None else reference.new_zeros(shape)).reshape(-1)
            for grad, shape in zip(grads, ctx.copy_shapes)
        ]).to(ctx.parameter_dtype)
        for start, end, scaling in ctx.scaled:
            flat[start:end].mul_(scaling)
        pieces = flat.split([math.prod(shape) for shape in ctx.parameter_shapes])
        return (None,) * 5 + tuple(piece.view(shape) for piece, shape in zip(pieces, ctx.parameter_shapes))


class BlockAdapterCopies:
    """A decoder block's `forward` (`forward`, compiled or not) run with its LoRA layers' adapters cast once for
    the call: see the module's docstring. Layers that do not compute together at the call (DoRA, a float8 base,
    adapters switched off by `adapters_disabled`) cast nothing and read nothing."""

    def __init__(self, block: nn.Module, forward: Callable[..., Any]) -> None:
        from litft.adapters.lora import LoRALinear

        self.forward = forward
        # Groups first, by parent module, in module order; every other LoRA layer on its own.
        self.groups: list[list[LoRALinear]] = []
        grouped: set[int] = set()
        for module in block.modules():
            for names in GROUPS:
                layers = [getattr(module, name, None) for name in names]
                if all(isinstance(layer, LoRALinear) for layer in layers):
                    self.groups.append(layers)
                    grouped.update(id(layer) for layer in layers)
        self.groups += [[layer] for layer in block.modules()
                        if isinstance(layer, LoRALinear) and id(layer) not in grouped]
        for group in self.groups:
            for position, layer in enumerate(group):
                layer.prepared_group = (position, len(group))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        groups = self._computing_groups()
        x = args[0] if args else next(iter(kwargs.values()))
        if not groups or not x.is_floating_point():
            return self.forward(*args, **kwargs)
        dtype = operator_dtype(x)
        layers = [layer for group in groups for layer in group]
        copies = iter(adapter_copies(groups, dtype))
        try:
            for group in groups:
                group[0].prepared_lora_a = next(copies)
            for layer in layers:
                layer.prepared_lora_b = next(copies)
            for group in groups:
                if len(group) > 1:
                    group[0].prepared_update_blocks = next(copies)
            return self.forward(*args, **kwargs)
        finally:
            for layer in layers:
                layer.prepared_lora_a = layer.prepared_lora_b = layer.prepared_update_blocks = None

    def _computing_groups(self) -> list[list[nn.Module]]:
        """The groups whose layers all compute together now (checked per call: `adapters_disabled` switches them)."""
        if not ENABLED:
            return []
        return [group for group in self.groups if all(computes_together(layer) for layer in group)]


# Where B's elements go in the diagonal blocks, by the groups' B shapes and device: one index for all the blocks of a
# model (per block, llama-8b's would take 0.13 GiB).
_block_positions: dict[tuple, torch.Tensor] = {}


def adapter_copies(groups: Sequence[Sequence[nn.Module]], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """[stacked s A of each group, ..., B of each layer, ..., diag(B_1, ...) of each group of several layers, ...]
    in `dtype`, from one concatenation: the A views (sum r_i, K) in group order, the B views (N_i, r_i) in layer
    order, then the diagonal blocks (sum N_i, sum r_i), which take no gradient (the operators form B's gradient
    themselves). Groups of several layers come first."""
    layers = [layer for group in groups for layer in group]
    parameters = [layer.lora_A.weight for layer in layers] + [layer.lora_B.weight for layer in layers]
    scaled, start = [], 0
    for layer in layers:  # runs of one scaling, usually one for all A factors
        end = start + layer.lora_A.weight.numel()
        if scaled and scaled[-1][2] == layer.scaling and scaled[-1][1] == start:
            scaled[-1] = (scaled[-1][0], end, layer.scaling)
        else:
            scaled.append((start, end, layer.scaling))
        start = end
    shapes = [(sum(layer.rank for layer in group), group[0].in_features) for group in groups]
    shapes += [tuple(layer.lora_B.weight.shape) for layer in layers]
    several = [group for group in groups if len(group) > 1]
    block_shapes = [(sum(layer.out_features for layer in group), sum(layer.rank for layer in group))
                    for group in several]
    positions = None
    if several:
        device = parameters[0].device
        key = (tuple(tuple(tuple(layer.lora_B.weight.shape) for layer in group) for group in several), device)
        if key not in _block_positions:
            _block_positions[key] = diagonal_positions(key[0]).to(device)
        positions = _block_positions[key]
    return _AdapterCopies.apply(dtype, scaled, shapes, positions, block_shapes, *parameters)


def diagonal_positions(groups: Sequence[Sequence[tuple[int, int]]]) -> torch.Tensor:
    """For groups of B shapes (N_i, r_i): where each element of B_1, B_2, ... (row-major, one group after another)
    lies in the groups' diag(B_1, B_2, ...) matrices (sum N_i, sum r_i), laid one after another (int64)."""
    positions, base = [], 0
    for shapes in groups:
        width = sum(rank for _, rank in shapes)
        row, column = 0, 0
        for rows, rank in shapes:
            grid = (torch.arange(rows).unsqueeze(1) + row) * width + torch.arange(rank) + column  # (rows, rank)
            positions.append(grid.reshape(-1) + base)
            row, column = row + rows, column + rank
        base += sum(rows for rows, _ in shapes) * width
    return torch.cat(positions)


def wrap_block_forward(block: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    """`forward` wrapped in `BlockAdapterCopies` where the block has LoRA layers, else `forward` itself."""
    return BlockAdapterCopies(block, forward) if has_lora_layers(block) else forward


def has_lora_layers(block: nn.Module) -> bool:
    from litft.adapters.lora import LoRALinear

    return any(isinstance(module, LoRALinear) for module in block.modules())
