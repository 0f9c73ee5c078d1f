"""A gated MLP whose three projections are LoRA layers, computed in two opaque operators (forward, backward).

    down_proj(act(gate_proj(x)) * up_proj(x))        act = SiLU (Llama, Mistral, Qwen) or tanh-GELU (Gemma)

It builds on `litft.adapters.lora_projections` (gate and up read x once for both adapters; each base GEMM adds
into its adapter's output in place) and hands the activation to the kernels of
`litft.kernels.gated_activation`, which compute down_proj's adapter input and, in the backward, gate's and up's
adapter gradients from the tiles they already hold. Compared with the three layers computed apart, a llama-8b
layer skips one read of h (forward), one recomputation of h and one read of both M x I gradients (backward).

Saved for the backward: x, gate, up and the rank-deep `low`s, what the layers computed apart keep (h is
recomputed). The Hugging Face parameter names do not change. A layer with a bias, a layer that cannot join a
group (`computes_together`) or differing base storage leaves the MLP to the layers computed apart.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from litft.adapters.lora_projections import computes_together, frozen_weights
from litft.kernels.gated_activation import ACTIVATIONS, gated_backward, gated_forward


def _layer_weights(weights, state, state_counts, mode, out_features, nested_blocksizes, dtype, layers, in_features):
    """The frozen weights of layers `layers` (a slice of gate, up, down), dequantized transiently if stored so."""
    first = sum(state_counts[: layers.start])
    counts = state_counts[layers]
    return frozen_weights(weights[layers], state[first : first + sum(counts)], counts, mode, out_features[layers],
                          in_features, nested_blocksizes[layers], dtype)


@torch.library.custom_op("litft::lora_gated_mlp", mutates_args=())
def lora_gated_mlp(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    state: list[torch.Tensor],
    state_counts: list[int],
    mode: str,
    out_features: list[int],
    nested_blocksizes: list[int],
    lora_a: torch.Tensor,
    lora_b: list[torch.Tensor],
    lora_a_down: torch.Tensor,
    lora_b_down: torch.Tensor,
    activation: str,
) -> list[torch.Tensor]:
    """[y, gate, up, low, low_down]: the MLP's output (..., N) and what the backward keeps. `weights` are gate's,
    up's and down's; `lora_a` gate's and up's s A stacked (r_gate + r_up, K), `lora_b` their B factors;
    `lora_a_down` down's s A (r_down, I) and `lora_b_down` its B (N, r_down), all in x's dtype."""
    in_features, width = x.shape[-1], out_features[0]
    flat_x = x.reshape(-1, in_features)  # (M, K)
    low = flat_x @ lora_a.t()  # (M, r_gate + r_up)
    rank_gate = lora_b[0].shape[1]
    gate_weight, up_weight = _layer_weights(weights, state, state_counts, mode, out_features, nested_blocksizes,
                                            x.dtype, slice(0, 2), in_features)
    gate = low[:, :rank_gate] @ lora_b[0].t()  # (M, I)
    gate.addmm_(flat_x, gate_weight.t())
    up = low[:, rank_gate:] @ lora_b[1].t()  # (M, I)
    up.addmm_(flat_x, up_weight.t())
    del gate_weight, up_weight  # a dequantized 4-bit base lives no longer than its GEMM
    hidden, low_down = gated_forward(gate, up, lora_a_down, activation)  # (M, I), (M, r_down)
    (down_weight,) = _layer_weights(weights, state, state_counts, mode, out_features, nested_blocksizes, x.dtype,
                                    slice(2, 3), width)
    output = low_down @ lora_b_down.t()  # (M, N)
    output.addmm_(hidden, down_weight.t())
    return [output.view(*x.shape[:-1], out_features[2]), gate, up, low, low_down]


@lora_gated_mlp.register_fake
def _(x, weights, state, state_counts, mode, out_features, nested_blocksizes, lora_a, lora_b, lora_a_down,
      lora_b_down, activation):
    tokens = x.numel() // x.shape[-1]
    return [
        x.new_empty((*x.shape[:-1], out_features[2])),
        x.new_empty((tokens, out_features[0])),
        x.new_empty((tokens, out_features[1])),
        x.new_empty((tokens, lora_a.shape[0])),
        x.new_empty((tokens, lora_a_down.shape[0])),
    ]


@torch.library.custom_op("litft::lora_gated_mlp_backward", mutates_args=())
def lora_gated_mlp_backward(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    low: torch.Tensor,
    low_down: torch.Tensor,
    weights: list[torch.Tensor],
    state: list[torch.Tensor],
    state_counts: list[int],
    mode: str,
    out_features: list[int],
    nested_blocksizes: list[int],
    lora_a: torch.Tensor,
    lora_b: list[torch.Tensor],
    lora_a_down: torch.Tensor,
    lora_b_down: torch.Tensor,
    activation: str,
    input_grad: bool,
) -> list[torch.Tensor]:
    """[grad_x (empty when not `input_grad`), grad_lora_a, grad_b_gate, grad_b_up, grad_lora_a_down, grad_b_down]."""
    in_features, width = x.shape[-1], out_features[0]
    flat_x = x.reshape(-1, in_features)  # (M, K)
    flat_grad = grad_output.reshape(-1, out_features[2])  # (M, N)
    grad_low_down = flat_grad @ lora_b_down  # (M, r_down)
    grad_b_down = flat_grad.t() @ low_down  # (N, r_down)
    (down_weight,) = _layer_weights(weights, state, state_counts, mode, out_features, nested_blocksizes, x.dtype,
                                    slice(2, 3), width)
    grad_hidden = grad_low_down @ lora_a_down  # (M, I)
    grad_hidden.addmm_(flat_grad, down_weight)
    del down_weight
    grad_gate, grad_up, grad_low_gate, grad_low_up, hidden = gated_backward(
        grad_hidden, gate, up, lora_b[0], lora_b[1], activation
    )
    del grad_hidden
    grad_lora_a_down = grad_low_down.t() @ hidden  # (r_down, I)
    del hidden
    rank_gate = lora_b[0].shape[1]
    grad_b_gate = grad_gate.t() @ low[:, :rank_gate]  # (I, r_gate)
    grad_b_up = grad_up.t() @ low[:, rank_gate:]  # (I, r_up)
    grad_low = torch.cat([grad_low_gate, grad_low_up], dim=1)  # (M, r_gate + r_up)
    grad_lora_a = grad_low.t() @ flat_x  # (r_gate + r_up, K)
    if input_grad:
        grad_x = grad_low @ lora_a  # (M, K)
        gate_weight, up_weight = _layer_weights(weights, state, state_counts, mode, out_features, nested_blocksizes,
                                                x.dtype, slice(0, 2), in_features)
        grad_x.addmm_(grad_gate, gate_weight)
        grad_x.addmm_(grad_up, up_weight)
        grad_x = grad_x.view(x.shape)
    else:
        grad_x = x.new_empty(0)
    return [grad_x, grad_lora_a, grad_b_gate, grad_b_up, grad_lora_a_down, grad_b_down]


@lora_gated_mlp_backward.register_fake
def _(grad_output, x, gate, up, low, low_down, weights, state, state_counts, mode, out_features, nested_blocksizes,
      lora_a, lora_b, lora_a_down, lora_b_down, activation, input_grad):
    return [
        x.new_empty(x.shape) if input_grad else x.new_empty(0),
        lora_a.new_empty(lora_a.shape),
        *(update.new_empty(update.shape) for update in lora_b),
        lora_a_down.new_empty(lora_a_down.shape),
        lora_b_down.new_empty(lora_b_down.shape),
    ]


def _setup_context(ctx: Any, inputs: tuple, output: list[torch.Tensor]) -> None:
    (x, weights, state, state_counts, mode, out_features, nested_blocksizes, lora_a, lora_b, lora_a_down,
     lora_b_down, activation) = inputs
    _, gate, up, low, low_down = output
    ctx.save_for_backward(x, gate, up, low, low_down, lora_a, lora_a_down, lora_b_down, *weights, *state, *lora_b)
    ctx.sizes = (len(weights), len(state))
    ctx.arguments = (state_counts, mode, out_features, nested_blocksizes, activation)


def _backward(ctx: Any, grad_outputs: list[torch.Tensor | None]) -> tuple:
    layer_count, state_count = ctx.sizes
    x, gate, up, low, low_down, lora_a, lora_a_down, lora_b_down, *rest = ctx.saved_tensors
    weights, state, lora_b = rest[:layer_count], rest[layer_count : layer_count + state_count], rest[-2:]
    state_counts, mode, out_features, nested_blocksizes, activation = ctx.arguments
    grad_output = grad_outputs[0]
    if grad_output is None:
        grad_output = torch.zeros((*x.shape[:-1], out_features[2]), dtype=x.dtype, device=x.device)
    input_grad = ctx.needs_input_grad[0]
    grad_x, grad_lora_a, grad_b_gate, grad_b_up, grad_lora_a_down, grad_b_down = lora_gated_mlp_backward(
        grad_output, x, gate, up, low, low_down, weights, state, state_counts, mode, out_features, nested_blocksizes,
        lora_a, lora_b, lora_a_down, lora_b_down, activation, input_grad,
    )
    # One entry per input, a list where the input is a list of tensors (frozen weights and state, the B factors).
    return (
        grad_x if input_grad else None, [None] * layer_count, [None] * state_count, None, None, None, None,
        grad_lora_a, [grad_b_gate, grad_b_up], grad_lora_a_down, grad_b_down, None,
    )


lora_gated_mlp.register_autograd(_backward, setup_context=_setup_context)


def computes_gated_mlp(gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> bool:
    """Whether the three layers compute in the operators above: LoRA layers that each could join a group
    (`computes_together`), with the fused activation on, no bias, and their bases stored alike."""
    layers = (gate_proj, up_proj, down_proj)
    if not all(computes_together(layer) and layer.fuse_activation and layer.bias is None for layer in layers):
        return False
    return len({"none" if layer.quantization is None else layer.quantization.mode for layer in layers}) == 1


def model_computes_gated_mlp(model: nn.Module) -> bool:
    """Whether the first decoder block's MLP of `model` computes in the operators above (its activations, kept for
    the backward, are then fewer in eager mode: `litft.training.estimate`)."""
    mlp = getattr(model.blocks[0], "mlp", None) if len(model.blocks) else None
    layers = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return all(isinstance(layer, nn.Module) for layer in layers) and computes_gated_mlp(*layers)


def forward_gated_mlp(
    x: torch.Tensor, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, activation: str
) -> torch.Tensor | None:
    """down_proj(act(gate_proj(x)) * up_proj(x)) in the operators above, or None where they do not apply (the
    caller then computes the layers apart): a layer that cannot join a group, a bias, bases stored differently,
    the fused activation switched off (`set_fused_activation`), an activation the kernels do not know."""
    layers = (gate_proj, up_proj, down_proj)
    if activation not in ACTIVATIONS or not computes_gated_mlp(*layers):
        return None
    modes = {"none" if layer.quantization is None else layer.quantization.mode for layer in layers}
    # Autocast does not reach into custom operators: the input is cast as autocast would cast F.linear's.
    mlp_input = x
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        mlp_input = x.to(torch.get_autocast_dtype(x.device.type))
    dtype = mlp_input.dtype
    state, state_counts = [], []
    for layer in layers:
        layer_state = layer.quantization.state_tensors(layer) if layer.quantization is not None else []
        state.extend(layer_state)
        state_counts.append(len(layer_state))
    # The scalings ride in the kernels that cast the A factors (s B A x = B (s A) x), as in `lora_projections`.
    lora_a = torch.cat([gate_proj.lora_A.weight * gate_proj.scaling, up_proj.lora_A.weight * up_proj.scaling])
    output, *_ = lora_gated_mlp(
        mlp_input,
        [layer.weight for layer in layers],
        state,
        state_counts,
        modes.pop(),
        [layer.out_features for layer in layers],
        [getattr(layer, "nested_blocksize", None) or 0 for layer in layers],
        lora_a.to(dtype),
        [gate_proj.lora_B.weight.to(dtype), up_proj.lora_B.weight.to(dtype)],
        (down_proj.lora_A.weight * down_proj.scaling).to(dtype),
        down_proj.lora_B.weight.to(dtype),
        activation,
    )
    return output
