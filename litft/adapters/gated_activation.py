"""A gated MLP's product h = act(gate) * up: the activations' formulas, shared by every kernel that forms h.

Llama's MLP gates with SiLU, Gemma's with GELU (tanh form). Three kernels form h: the elementwise product below,
the LoRA down operator's backward (`litft.adapters.lora_gated_down`), which forms h again where it reads gate and
up, and the joined gate/up GEMM (`litft.adapters.lora_gemm.gated_projections`), which forms h from the tiles of
gate and up it has just computed. All three take the activation and its slope from the one jitted function built
here, in float32, and round h once to the activations' dtype, so the h a backward forms is the h the forward used.
Without Triton (CPU, outside the interpreter) the same formulas run as torch operations.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

from litft.triton_support import kernels_run_on, launching_on

ACTIVATIONS = ("silu", "gelu_tanh")
tl = None  # triton.language, once a kernel is built (see jitted_activation)
PRODUCT_BLOCK = 2048  # elements per program of the elementwise product


def jitted_activation(language: str = "triton"):
    """The jitted `activation(gate, GELU) -> (act(gate), d act / d gate)`, float32 in and out. A kernel's builder
    makes it a global of the kernel's module (Triton resolves calls through the caller's globals), built afresh
    with the kernel: Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) is chosen when a function is
    decorated. `language="gluon"`: the same function for Gluon kernels (`litft.adapters.lora_gemm_pingpong`),
    its `tl` bound to Gluon's language."""
    # triton.language as a global of this module: Triton's interpreter looks for it in a jitted function's globals
    # when another module's kernel calls the function.
    global tl
    import triton
    import triton.language as tl

    def activation(gate, GELU: tl.constexpr):
        # No triton.language jitted helpers (tl.sigmoid): they are built when triton is imported and would not be
        # interpreted in a process that chose the interpreter later.
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

    if language == "gluon":
        from triton.experimental import gluon
        from triton.experimental.gluon import language as gluon_language

        # The same code under globals whose `tl` is Gluon's language (Gluon's builtins take Gluon's tensors).
        gluon_activation = types.FunctionType(activation.__code__, {**globals(), "tl": gluon_language},
                                              activation.__name__)
        return gluon.jit(gluon_activation)
    return triton.jit(activation)


activation_and_slope = None  # jitted_activation(), a module global once the kernel is built


@functools.cache
def _product_kernel():
    global activation_and_slope
    import triton
    import triton.language as tl

    activation_and_slope = jitted_activation()

    @triton.jit
    def gated_product_kernel(gate_ptr, up_ptr, out_ptr, count, columns, gate_row_stride, up_row_stride,
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

    return gated_product_kernel


def activation_torch(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) in float32 through torch's own activations (CPU without the interpreter): a float32 model then
    computes what `down(act(gate) * up)` does, to the last bit (a fresh adapter leaves the base model unchanged)."""
    if activation == "gelu_tanh":
        return nn.functional.gelu(gate.float(), approximate="tanh")
    return nn.functional.silu(gate.float())


def slope_torch(gate: torch.Tensor, activation: str) -> torch.Tensor:
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
        return (activation_torch(gate, activation) * up.float()).to(gate.dtype)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    count = gate.numel()
    contiguous = gate.is_contiguous() and up.is_contiguous()
    with launching_on(gate):
        _product_kernel()[((count + PRODUCT_BLOCK - 1) // PRODUCT_BLOCK,)](
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
