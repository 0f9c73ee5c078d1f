"""The gated activation of a LoRA MLP (h = act(gate) * up, SwiGLU or GeGLU) fused with the rank-deep GEMMs that
read the tensors it reads or writes.

A LoRA MLP's adapters read and write the widest tensors of the block. Compiled, each pass was its own kernel: the
activation wrote h, then down_proj's adapter read h again (low = h @ (s A)^T); in the backward, h was recomputed
(one more pass over gate and up) for A's gradient, and gate/up's adapters read the two gradients again for
g_low = d(gate) @ B. Here one pass over a block of rows does each side:

    forward   h = act(gate) * up                         (M, I)  written once
              low = h @ (s A_down)^T                     (M, r)  from the h tile still in registers
    backward  d(gate), d(up) from d(h), gate, up         (M, I)  written once, with h (for A_down's gradient)
              g_low_gate = d(gate) @ B_gate, g_low_up = d(up) @ B_up   (M, r) from the tiles in registers

A program owns a block of rows and walks along I, so the rank-deep products reduce in registers (no atomics).
Measured on llama-8b: benchmarks/NOTES.md, section 9.

`gated_forward` / `gated_backward` take Triton on a CUDA device in 16-bit floats, the plain-torch twin elsewhere
(CPU, float32); the twin is the definition the tests compare the kernels with. Activations compute in float32 and
round once, as a compiled `F.silu(gate) * up` does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


# ----------------------------------------------------------------------------------------------------------------
# The definition, in plain torch


def _activation_and_slope(gate: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """act(gate) and act'(gate), float32."""
    gate = gate.float()
    # torch's own activations for the values: a fresh adapter (B = 0) then computes its base model bit for bit.
    if activation == "silu":
        sigmoid = torch.sigmoid(gate)
        return F.silu(gate), sigmoid * (1 + gate * (1 - sigmoid))
    tanh = torch.tanh(_SQRT_2_OVER_PI * (gate + _GELU_CUBIC * gate**3))
    slope = 0.5 * (1 + tanh) + 0.5 * gate * (1 - tanh * tanh) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * gate * gate)
    return F.gelu(gate, approximate="tanh"), slope


def gated_forward_reference(gate, up, lora_a_down, activation):
    act, _ = _activation_and_slope(gate, activation)
    hidden = (act * up.float()).to(gate.dtype)  # (M, I)
    return hidden, hidden @ lora_a_down.t()  # (M, I), (M, r)


def gated_backward_reference(grad_hidden, gate, up, lora_b_gate, lora_b_up, activation):
    act, slope = _activation_and_slope(gate, activation)
    grad_hidden32, up32 = grad_hidden.float(), up.float()
    grad_gate = (grad_hidden32 * up32 * slope).to(gate.dtype)  # (M, I)
    grad_up = (grad_hidden32 * act).to(gate.dtype)  # (M, I)
    hidden = (act * up32).to(gate.dtype)  # (M, I)
    return grad_gate, grad_up, grad_gate @ lora_b_gate, grad_up @ lora_b_up, hidden


# ----------------------------------------------------------------------------------------------------------------
# The entry points


def _uses_triton(tensor: torch.Tensor) -> bool:
    if tensor.device.type != "cuda" or tensor.dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        import triton  # noqa: F401  (ships with CUDA builds of torch)
    except ImportError:
        return False
    return True


def gated_forward(gate: torch.Tensor, up: torch.Tensor, lora_a_down: torch.Tensor, activation: str):
    """(h, low): h = act(gate) * up (M, I) and low = h @ lora_a_down^T (M, r), lora_a_down = s A of down_proj."""
    if _uses_triton(gate):
        from litft.kernels.gated_activation_triton import triton_gated_forward

        return triton_gated_forward(gate.contiguous(), up.contiguous(), lora_a_down, activation)
    return gated_forward_reference(gate, up, lora_a_down, activation)


def gated_backward(grad_hidden: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, lora_b_gate: torch.Tensor,
                   lora_b_up: torch.Tensor, activation: str):
    """(d gate, d up, d gate @ B_gate, d up @ B_up, h) from d h: the activation's backward and the gradients of the
    gate and up adapters' rank-deep outputs, with h recomputed for down_proj's adapter. The kernel writes h over
    `grad_hidden` (one M x I tensor less at the backward's peak): pass a tensor that is not needed afterwards."""
    if _uses_triton(gate):
        from litft.kernels.gated_activation_triton import triton_gated_backward

        return triton_gated_backward(grad_hidden, gate.contiguous(), up.contiguous(), lora_b_gate, lora_b_up,
                                     activation)
    return gated_backward_reference(grad_hidden, gate, up, lora_b_gate, lora_b_up, activation)
