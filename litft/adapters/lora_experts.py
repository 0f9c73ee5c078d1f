"""A mixture's LoRA experts computed together, through grouped GEMMs.

Run one by one, a 128-expert layer is ~400 small LoRA projections, each several kernels and some Python. Together,
with the tokens already sorted by expert (`litft.models.llama.SparseMoE`), one grouped GEMM (`torch._grouped_mm`:
a matrix per expert, each applied to its own run of rows) does each of these for all experts at once:

    gate | up = x @ [W_gate; W_up]^T + scaling * (x @ A^T) @ B^T      (A: gate's and up's stacked, 2r rows)
    y         = h @ W_down^T + scaling * (h @ A_down^T) @ B_down^T,   h = silu(gate) * up * router weight

For that, `lay_experts_back_to_back` puts every expert's frozen gate and up weights in one (experts, 2I, C) storage
and the down weights in one (experts, C, I), each expert's `weight` staying its own parameter under its own name,
a view into it (as `lora_projections.join_frozen_weights` does for q, k and v). The adapters' factors are stacked
for each call (rank-sized: small). Autograd differentiates the grouped GEMMs; the frozen weights take no gradient.

Quantized experts (QLoRA): their NF4 tensors (packed values, block scales, group scales, offsets) are laid back to
back the same way, and each grouped GEMM dequantizes all experts' weights of its kind in one kernel launch into one
buffer, in the forward and again in the backward, so that no layer's dequantized experts wait for its backward.

Where this does not apply (on CPU, whose grouped GEMM is missing; dropout, DoRA, adapters switched off, a rank or
width the grouped GEMM cannot align, FSDP2's re-allocated shards), `experts_together` returns None and the experts
run one by one, computing the same thing (tests/test_moe.py compares the two).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from litft.adapters.lora_projections import back_to_back

# torch._grouped_mm's operands: 16-byte aligned rows, i.e. every reduction and output width a multiple of 8
# elements in 16-bit floats.
ALIGNMENT = 8
ENABLED = True  # False: every expert on its own (the A/B of benchmarks/bench.py --experts_one_by_one)
# Quantized experts dequantize all at once, which pays only for enough rows: decoding a few tokens runs the few
# chosen experts one by one instead.
QUANTIZED_ROWS_PER_EXPERT = 16


def _projections(experts: nn.ModuleList) -> list[list[nn.Module]]:
    """Each expert's (gate, up, down) layers."""
    return [[getattr(expert, name) for name in expert.names] for expert in experts]


def lay_experts_back_to_back(model: nn.Module) -> int:
    """Lays the frozen weights of every mixture of LoRA experts in `model` back to back (see the module's
    docstring); returns how many mixtures it laid out. Mixtures whose experts are not all LoRA layers, either
    plain-weight ones of one dtype and device or NF4 ones of one format, stay as they are."""
    from litft.adapters.lora import LoRALinear

    laid = 0
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.ModuleList) or not all(hasattr(expert, "names") for expert in experts):
            continue
        gate_up_order, downs = _kinds(_projections(experts))
        flat = gate_up_order + downs
        if not all(type(layer) is LoRALinear for layer in flat):
            continue
        if all(layer.quantization is None for layer in flat):
            weights = [layer.weight for layer in flat]
            if any(weight.requires_grad or weight.is_meta for weight in weights):
                continue
            if len({(weight.dtype, weight.device) for weight in weights}) > 1:
                continue
        elif not all(_can_lay_quantized(ordered) for ordered in (gate_up_order, downs)):
            continue
        for ordered in (gate_up_order, downs):
            _lay(ordered, _tensor_names(ordered[0]))
        laid += 1
    return laid


def _kinds(layers: list[list[nn.Module]]) -> tuple[list[nn.Module], list[nn.Module]]:
    """The experts' layers in the order they lie back to back: gate and up of each expert side by side (so that
    together they read as (E, 2I, C)), then every down (E, C, I)."""
    return [layer for gate, up, _ in layers for layer in (gate, up)], [down for _, _, down in layers]


# A 4-bit weight's tensors, each laid back to back across a mixture's experts: the packed values, the block scales
# and, with double quantization, the groups' scales and the offset (one per weight).
QUANTIZED_TENSORS = ("weight", "weight_absmax", "weight_nested_absmax", "weight_offset")


def _tensor_names(layer: nn.Module) -> tuple[str, ...]:
    quantization = layer.quantization
    if quantization is None:
        return ("weight",)
    return QUANTIZED_TENSORS if quantization.double_quant else QUANTIZED_TENSORS[:2]


def _can_lay_quantized(ordered: list[nn.Module]) -> bool:
    """Whether one kernel launch can dequantize `ordered`'s 4-bit weights laid back to back (`nf4_dequantize`,
    `weight_count`): NF4 of one format and size, and with double quantization, groups of block scales that do not
    straddle two weights and one group-scale table."""
    from litft.adapters.quantization import BLOCKSIZE_4BIT

    first = ordered[0]
    quantization = first.quantization
    values = first.out_features * first.in_features
    if quantization is None or quantization.mode != "bnb.nf4" or first.weight.is_meta or values % (2 * BLOCKSIZE_4BIT):
        return False
    if any(layer.quantization != quantization or layer.out_features * layer.in_features != values for layer in ordered):
        return False
    if quantization.double_quant:
        if (values // BLOCKSIZE_4BIT) % first.nested_blocksize:
            return False
        if any(not torch.equal(layer.weight_nested_code, first.weight_nested_code) for layer in ordered):
            return False
    return True


def _lay(ordered: list[nn.Module], names: tuple[str, ...]) -> None:
    """Copies each tensor `names` of the layers `ordered` into one joint tensor per name, in that order, and makes
    each layer's tensor a view into it, under its own name, shape and values."""
    for name in names:
        tensors = [getattr(layer, name) for layer in ordered]
        joint = torch.cat([tensor.reshape(-1) for tensor in tensors])
        size = tensors[0].numel()
        for index, (layer, tensor) in enumerate(zip(ordered, tensors)):
            view = joint[index * size : (index + 1) * size].view(tensor.shape)
            if name == "weight":
                layer.weight = nn.Parameter(view, requires_grad=False)
            else:
                setattr(layer, name, view)  # a registered buffer: replaced in place under its name


def _joint(ordered: list[nn.Module], name: str) -> torch.Tensor | None:
    """The layers' tensors `name` as one flat tensor without a copy, where `_lay` left them back to back; else
    None (e.g. FSDP2 re-allocated them)."""
    joint = back_to_back([getattr(layer, name).view(-1, 1) for layer in ordered])
    return None if joint is None else joint.view(-1)


def _dequantized_together(ordered: list[nn.Module], shape: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """`ordered`'s laid-out NF4 weights dequantized in one launch, as a (shape) tensor; per weight where they no
    longer lie back to back."""
    from litft.adapters import nf4_dequantize
    from litft.adapters.quantization import BLOCKSIZE_4BIT

    first = ordered[0]
    joint = [_joint(ordered, name) for name in _tensor_names(first)] if first.quantization.mode == "bnb.nf4" else [None]
    if any(tensor is None for tensor in joint) or not nf4_dequantize.can_dequantize(
        joint[0], first.out_features, first.in_features
    ):
        return _dequantized_each(ordered, shape, dtype)
    packed, state = joint[0], joint[1:]
    if first.quantization.double_quant:  # the dequantization's order: block codes, group scales, table, offsets
        state = [state[0], state[1], first.weight_nested_code, state[2]]
    out = nf4_dequantize.dequantize_nf4(
        packed, state, first.out_features, first.in_features, BLOCKSIZE_4BIT,
        getattr(first, "nested_blocksize", None) or 0, dtype, weight_count=len(ordered),
    )
    return out.view(shape)


def _applies(x: torch.Tensor, layers: list[list[nn.Module]]) -> bool:
    from litft.adapters.lora import LoRALinear

    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and hasattr(torch, "_grouped_mm")):
        return False
    if torch.compiler.is_compiling():
        return False
    flat = [layer for projections in layers for layer in projections]
    first = flat[0]
    mode = first.quantization.mode if first.quantization is not None else None
    for layer in flat:
        if type(layer) is not LoRALinear or layer.use_dora:
            return False
        if "forward" in layer.__dict__ or not isinstance(layer.lora_dropout, nn.Identity):  # switched off; dropout
            return False
        if layer.rank != first.rank or layer.scaling != first.scaling or layer.bias is not None:
            return False
        if layer.weight.requires_grad or type(layer.weight) is not nn.Parameter:
            return False
        quantization = layer.quantization
        if (quantization.mode if quantization is not None else None) != mode:
            return False
        weight_dtype = quantization.compute_dtype if quantization is not None else layer.weight.dtype
        if weight_dtype != x.dtype:
            return False
    gate = layers[0][0]
    return all(size % ALIGNMENT == 0 for size in (first.rank, gate.in_features, gate.out_features))


def _stack(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.stack(list(tensors)).to(dtype)


def experts_together(
    experts: nn.ModuleList, x: torch.Tensor, counts: list[int], row_weights: torch.Tensor
) -> torch.Tensor | None:
    """Every expert's SwiGLU output for its run of `x`'s rows (x sorted by expert, `counts[e]` rows each), each row
    times its router weight (`row_weights`), as one (rows, C) tensor, through grouped GEMMs; None where that path
    does not apply (see the module's docstring)."""
    layers = _projections(experts)
    if not ENABLED or not _applies(x, layers):
        return None
    # The frozen weights, (E, 2I, C) and (E, C, I), each from a call: the laid-out storage, or dequantized anew.
    if layers[0][0].quantization is not None:
        if x.shape[0] < QUANTIZED_ROWS_PER_EXPERT * len(layers):
            return None
        gate, _, down = layers[0]
        gate_up_order, downs = _kinds(layers)
        gate_up_shape = (len(layers), 2 * gate.out_features, gate.in_features)
        down_shape = (len(layers), down.out_features, down.in_features)
        gate_up_weights = functools.partial(_dequantized_together, gate_up_order, gate_up_shape, x.dtype)
        down_weights = functools.partial(_dequantized_together, downs, down_shape, x.dtype)
    else:
        gate_up_order, downs = _kinds(layers)
        gate_up, down = _joint(gate_up_order, "weight"), _joint(downs, "weight")
        if gate_up is None or down is None:
            return None
        gate, _, down_layer = layers[0]
        gate_up = gate_up.view(len(layers), 2 * gate.out_features, gate.in_features)
        down = down.view(len(layers), down_layer.out_features, down_layer.in_features)
        gate_up_weights, down_weights = functools.partial(_same, gate_up), functools.partial(_same, down)
    offsets = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(device=x.device, dtype=torch.int32)
    width, rank, scaling = layers[0][0].out_features, layers[0][0].rank, layers[0][0].scaling
    dtype = x.dtype
    a_gate = _stack([g.lora_A.weight for g, _, _ in layers], dtype)  # (E, r, C)
    a_gate_up = torch.cat([a_gate, _stack([u.lora_A.weight for _, u, _ in layers], dtype)], dim=1)  # (E, 2r, C)
    b_gate = _stack([g.lora_B.weight for g, _, _ in layers], dtype)  # (E, I, r)
    b_up = _stack([u.lora_B.weight for _, u, _ in layers], dtype)
    a_down = _stack([d.lora_A.weight for _, _, d in layers], dtype)  # (E, r, I)
    b_down = _stack([d.lora_B.weight for _, _, d in layers], dtype)  # (E, C, r)

    def grouped(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # rows @ weights[e]^T, per expert
        return torch._grouped_mm(rows, weights.transpose(1, 2), offs=offsets)

    base = _FrozenGroupedProduct.apply(x, offsets, gate_up_weights)  # (rows, 2I)
    low = grouped(x, a_gate_up) * scaling  # (rows, 2r)
    gate = base[:, :width] + grouped(low[:, :rank].contiguous(), b_gate)  # (rows, I)
    up = base[:, width:] + grouped(low[:, rank:].contiguous(), b_up)
    h = F.silu(gate) * up * row_weights[:, None]  # down is linear: weighting its input weights its output
    down = _FrozenGroupedProduct.apply(h, offsets, down_weights)
    return down + grouped(grouped(h, a_down) * scaling, b_down)  # (rows, C)


class _FrozenGroupedProduct(torch.autograd.Function):
    """rows @ W[e]^T for each expert's run of rows, W (E, N, K) frozen and produced by `weights()`, which the
    backward calls again for the input gradient rather than keep W: a 4-bit mixture's dequantized experts (1.2 GB per
    Qwen3-30B-A3B layer) then exist one layer at a time, not from each layer's forward to its backward."""

    @staticmethod
    def forward(
        ctx: Any, rows: torch.Tensor, offsets: torch.Tensor, weights: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        ctx.weights = weights
        ctx.save_for_backward(offsets)
        return torch._grouped_mm(rows, weights().transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (offsets,) = ctx.saved_tensors
        return torch._grouped_mm(grad_output.contiguous(), ctx.weights(), offs=offsets), None, None


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _dequantized_each(ordered: list[nn.Module], shape: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """`ordered`'s 4-bit (or int8, float8) weights dequantized one by one into consecutive rows of a (shape) tensor."""
    from litft.adapters.quantization import dequantize_weight

    out = torch.empty(shape, dtype=dtype, device=ordered[0].weight.device)
    rows = out.view(-1, shape[-1])
    start = 0
    for layer in ordered:
        target = rows[start : start + layer.out_features]
        quantization = layer.quantization
        if quantization.mode == "fp8":
            target.copy_(quantization.dequantize(layer))
        else:
            dequantize_weight(
                layer.weight, quantization.state_tensors(layer), quantization.mode, layer.out_features,
                layer.in_features, getattr(layer, "nested_blocksize", None) or 0, dtype, out=target,
            )
        start += layer.out_features
    return out
