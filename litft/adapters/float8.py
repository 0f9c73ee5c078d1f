"""A frozen base whose matrix multiplies run in 8-bit float (`--quantize fp8`): speed, not memory.

On GPUs with 8-bit float tensor cores (compute capability 8.9+: Ada, Hopper) a float8 GEMM runs at about twice
the bf16 rate. A LoRA step spends most of its time in the frozen base's two GEMMs per layer, the forward
x @ W^T and the input gradient dy @ W, so both run in float8 here, with the adapters, norms, attention and loss
unchanged in the compute dtype.

Scaling (float8 e4m3 holds about two decimal digits between 2^-9 and 448):
  - the weight is quantized once, as it loads, with one scale per output row for the forward; the input gradient
    needs the weight along its other axis, so a second copy, transposed, is quantized with one scale per input
    column. Two bytes per weight in all: the bf16 base's memory, in exchange for the speed;
  - activations and output gradients are quantized per token (one scale per row), just before each GEMM; under
    torch.compile that fuses into the kernel that produced them.
The GEMM accumulates in float32 and applies both scales to its output (`torch._scaled_mm`).
Both copies are frozen Parameters holding the float8 bytes as uint8 (viewed as float8 where multiplied): process
groups cannot broadcast a float8 tensor, so DDP's start-up sync and FSDP2's sharding move plain bytes.

What it costs in accuracy: each GEMM's output is off by ~4% of its norm (bf16: ~0.2%, measured by
`benchmarks/bench_kernels.py`), so the loss differs from a bf16 run's by a few parts in a thousand on real
checkpoints; the tests bound it. Merging and saving adapters never see the 8-bit weights: a merged model is
formed from the checkpoint's own weights.
"""

from __future__ import annotations

import torch

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max
# Every dimension a float8 GEMM reduces over or writes along must be a multiple of 16 (the tensor-core tile).
FLOAT8_ALIGNMENT = 16


def aligned(in_features: int, out_features: int) -> bool:
    """Whether a linear layer of these sizes can run its GEMMs in float8 (others keep the compute dtype)."""
    return in_features % FLOAT8_ALIGNMENT == 0 and out_features % FLOAT8_ALIGNMENT == 0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, columns) -> float8 values (rows, columns) and float32 scales (rows, 1), x ~ values * scales.

    Each row is scaled so that its largest magnitude maps to float8's largest value; an all-zero row gets a tiny
    scale instead of a division by zero."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=1e-12) / FLOAT8_MAX
    values = (x.float() / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8)
    return values, scale


def quantize_weight(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two float8 copies of a frozen weight (out, in), as uint8 bytes, and their float32 scales."""
    forward_values, forward_scale = quantize_rows(weight)  # (out, in), (out, 1)
    transposed_values, transposed_scale = quantize_rows(weight.t())  # (in, out), (in, 1)
    return {
        "weight": forward_values.view(torch.uint8),
        "weight_transposed": transposed_values.contiguous().view(torch.uint8),
        "weight_scale": forward_scale.reshape(-1),  # (out,)
        "weight_transposed_scale": transposed_scale.reshape(-1),  # (in,)
    }


def dequantize_weight(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The forward copy (out, in) back in `dtype` (for DoRA's norms and inspection)."""
    return (values.view(FLOAT8).float() * scale.unsqueeze(1)).to(dtype)


def scaled_matmul(
    x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """x (rows, k) in any float dtype @ W^T where W (n, k) = values * scale[:, None], values the float8 bytes as
    uint8; returns (rows, n)."""
    x_values, x_scale = quantize_rows(x)
    # _scaled_mm takes its second operand column-major: the (n, k) row-major copy transposed is exactly that.
    weight = values.view(FLOAT8).t()
    return torch._scaled_mm(x_values, weight, x_scale, scale.reshape(1, -1), out_dtype=out_dtype)


class Float8Linear(torch.autograd.Function):
    """y = x @ W^T (+ b) with the forward and the input gradient as float8 GEMMs; the weight is frozen, so the
    backward keeps nothing but the layer's own tensors (no activation is saved for it)."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, weight_transposed, weight_transposed_scale, bias):
        flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
        output = scaled_matmul(flat, weight, weight_scale, x.dtype)  # (tokens, out)
        if bias is not None:
            output = output + bias.to(x.dtype)
        ctx.save_for_backward(weight_transposed, weight_transposed_scale)
        ctx.input_shape = x.shape
        return output.view(*x.shape[:-1], output.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        weight_transposed, weight_transposed_scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            flat = grad_output.reshape(-1, grad_output.shape[-1])  # (tokens, out)
            # dy @ W = dy @ (W^T)^T: the transposed copy, scaled per input column, in the second operand's place.
            grad_x = scaled_matmul(flat, weight_transposed, weight_transposed_scale, grad_output.dtype)
            grad_x = grad_x.view(ctx.input_shape)
        return grad_x, None, None, None, None, None


def float8_linear(layer: torch.nn.Module, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
    """The output of a layer whose frozen weight is stored as float8 (see the module docstring)."""
    return Float8Linear.apply(
        x, layer.weight, layer.weight_scale, layer.weight_transposed, layer.weight_transposed_scale,
        layer.bias if with_bias else None,
    )


def float8_unsupported_reason(device: torch.device) -> str | None:
    """Why `device` cannot run float8 GEMMs (for the error message), or None where it can."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(device)
            return f"{name} has compute capability {major}.{minor}; float8 GEMMs need 8.9 or newer (Ada, Hopper)"
    return None
