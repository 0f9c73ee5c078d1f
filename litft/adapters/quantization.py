"""Frozen linear layers whose weight is stored quantized: the QLoRA base (bitsandbytes 4-bit and 8-bit), and an
8-bit float base for speed (`fp8`, see `litft.adapters.float8`).

`quantize_model` runs on the meta model (the `prepare` step of `litft.checkpoint.load_model`) and swaps every
`nn.Linear` except the output head for a `QuantizedLinear`. The loader then hands each checkpoint weight to the
layer's `load_checkpoint_tensor`, which quantizes it on the spot, so a full-precision copy of the model never exists.

How the quantized weight is stored, so FSDP2 sharding and `state_dict` keep everything:
  - `weight`: a frozen Parameter under the Hugging Face name. 4-bit: the packed nibbles viewed as the compute dtype
    (bitsandbytes' `quant_storage`), shape (out * in / 2 / itemsize, 1). 8-bit: int8, shape (out, in).
  - the quantization state (block scales, and for double quantization the scales of the scales and their code
    book) as plain buffers `weight_absmax`, `weight_nested_absmax`, `weight_nested_code`, `weight_offset` (4-bit) or
    `weight_scale` (8-bit). The bitsandbytes `QuantState` is rebuilt from these tensors at every use.

The forward dequantizes the weight and runs a plain matmul; the backward dequantizes again instead of keeping the
full-precision weight alive between forward and backward, which is what makes QLoRA's memory saving real. Both run
as opaque operators (`litft::dequantize_linear`), so torch.compile cannot merge the two dequantizations either.
`fp8` stores two float8 copies of each weight (Parameters `weight` and `weight_transposed`, float8 bytes as uint8;
buffers `weight_scale` and `weight_transposed_scale`) and multiplies in float8 without dequantizing
(`litft.adapters.float8`).
Do not cast a quantized model with `.to(dtype)`: that would reinterpret the packed data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from litft.adapters import float8, nf4_dequantize
from litft.errors import ConfigError

QUANTIZE_MODES = ("bnb.nf4", "bnb.fp4", "bnb.int8", "fp8")
# Names of the output head across families; it stays in full precision (as in the QLoRA paper).
OUTPUT_HEAD_NAMES = ("lm_head", "embed_out")
# bitsandbytes warns on every CPU run that an optional accelerated kernel package is missing; its own CPU kernels
# are what we use, so the warning is noise to a user.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

BLOCKSIZE_4BIT = 64  # bitsandbytes' default, the one the QLoRA paper uses
# NF4 weights dequantize in litft's one-kernel Triton version where it runs (False: bitsandbytes', for A/B runs).
use_nf4_kernel = True
_WARNED: set[str] = set()


@dataclass(frozen=True)
class WeightQuantization:
    """How one layer's frozen weight is stored: the bitsandbytes format and the dtype it dequantizes to."""

    mode: str
    compute_dtype: torch.dtype
    double_quant: bool = True

    @property
    def quant_type(self) -> str:
        return self.mode.removeprefix("bnb.")

    def store(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Quantizes `weight` (out, in) and puts the result on `module` as `weight` plus its state buffers."""
        if self.mode == "fp8":
            for name, tensor in float8.quantize_weight(weight).items():
                if name.endswith("_scale"):
                    module.register_buffer(name, tensor)
                else:  # Parameters, so that FSDP2 shards both copies
                    setattr(module, name, nn.Parameter(tensor, requires_grad=False))
            return
        import bitsandbytes.functional as bnb_functional

        if self.mode == "bnb.int8":
            # bitsandbytes' CUDA kernel takes float16 only; weights are far inside its range.
            quantized, row_scale, _ = bnb_functional.int8_vectorwise_quant(weight.to(torch.float16))
            module.weight = nn.Parameter(quantized, requires_grad=False)  # (out, in) int8
            module.register_buffer("weight_scale", row_scale)  # (out,) float32
            return
        packed, state = bnb_functional.quantize_4bit(
            weight,
            blocksize=BLOCKSIZE_4BIT,
            compress_statistics=self.double_quant,
            quant_type=self.quant_type,
            quant_storage=self.compute_dtype,
        )
        module.weight = nn.Parameter(packed, requires_grad=False)  # (out * in / 2 / itemsize, 1)
        module.register_buffer("weight_absmax", state.absmax)
        if self.double_quant:
            module.register_buffer("weight_nested_absmax", state.state2.absmax)
            module.register_buffer("weight_nested_code", state.state2.code)
            module.register_buffer("weight_offset", state.offset)
            module.nested_blocksize = state.state2.blocksize

    def state_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        """The tensors besides `weight` that the dequantization reads, in a fixed order (see `dequantize_weight`)."""
        if self.mode == "bnb.int8":
            return [module.weight_scale]
        if self.double_quant:
            return [module.weight_absmax, module.weight_nested_absmax, module.weight_nested_code, module.weight_offset]
        return [module.weight_absmax]

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The weight (out, in) in the compute dtype, rebuilt from the layer's own tensors."""
        if self.mode == "fp8":
            return float8.dequantize_weight(module.weight, module.weight_scale, self.compute_dtype)
        return dequantize_weight(
            module.weight, self.state_tensors(module), self.mode, module.out_features, module.in_features,
            getattr(module, "nested_blocksize", None) or 0, self.compute_dtype,
        )


def dequantize_weight(
    weight: torch.Tensor,
    state: list[torch.Tensor],
    mode: str,
    out_features: int,
    in_features: int,
    nested_blocksize: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A quantized weight (out, in) in `dtype`, from its storage and `WeightQuantization.state_tensors`; written
    into `out` (contiguous, (out, in), `dtype`) when given, as the grouped LoRA operator joins a group's weights."""
    import bitsandbytes.functional as bnb_functional

    if mode == "bnb.nf4" and use_nf4_kernel and nf4_dequantize.can_dequantize(weight, out_features, in_features):
        return nf4_dequantize.dequantize_nf4(
            weight, state, out_features, in_features, BLOCKSIZE_4BIT, nested_blocksize, dtype, out=out
        )
    if mode == "bnb.int8":
        (row_scale,) = state
        result = bnb_functional.int8_vectorwise_dequant(weight, row_scale).to(dtype)
        return result if out is None else out.copy_(result)
    nested_state = None
    offset = None
    absmax = state[0]
    if len(state) == 4:  # double quantization: the block scales are themselves quantized
        _, nested_absmax, nested_code, offset = state
        nested_state = bnb_functional.QuantState(
            absmax=nested_absmax, code=nested_code, blocksize=nested_blocksize, dtype=torch.float32
        )
    quant_state = bnb_functional.QuantState(
        absmax=absmax,
        shape=torch.Size((out_features, in_features)),
        blocksize=BLOCKSIZE_4BIT,
        quant_type=mode.removeprefix("bnb."),
        dtype=dtype,
        offset=offset,
        state2=nested_state,
    )
    result = bnb_functional.dequantize_4bit(weight, quant_state).to(dtype)
    return result if out is None else out.copy_(result)


# The dequantize-and-multiply is one opaque operator (forward and input-gradient), not Python that torch.compile
# traces: traced, the compiler sees the same dequantization in the forward and the backward graph, merges the two
# and keeps every full-precision weight alive from forward to backward (QLoRA then used more memory than LoRA).
# Opaque, the only thing saved for the backward is the packed weight the layer holds anyway.
@torch.library.custom_op("litft::dequantize_linear", mutates_args=())
def dequantize_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: list[torch.Tensor],
    bias: torch.Tensor | None,
    mode: str,
    out_features: int,
    in_features: int,
    nested_blocksize: int,
) -> torch.Tensor:
    """x @ dequantize(W)^T + b, W dequantized transiently in x's dtype."""
    full_weight = dequantize_weight(weight, state, mode, out_features, in_features, nested_blocksize, x.dtype)
    return F.linear(x, full_weight, None if bias is None else bias.to(x.dtype))


@dequantize_linear.register_fake
def _(x, weight, state, bias, mode, out_features, in_features, nested_blocksize):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("litft::dequantize_linear_input_grad", mutates_args=())
def dequantize_linear_input_grad(
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    state: list[torch.Tensor],
    mode: str,
    out_features: int,
    in_features: int,
    nested_blocksize: int,
) -> torch.Tensor:
    """grad_output @ dequantize(W): the gradient of x (the weight is frozen)."""
    full_weight = dequantize_weight(
        weight, state, mode, out_features, in_features, nested_blocksize, grad_output.dtype
    )
    return grad_output @ full_weight  # (..., out) @ (out, in) -> (..., in)


@dequantize_linear_input_grad.register_fake
def _(grad_output, weight, state, mode, out_features, in_features, nested_blocksize):
    return grad_output.new_empty((*grad_output.shape[:-1], in_features))


def _setup_dequantize_linear_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    _, weight, state, _, mode, out_features, in_features, nested_blocksize = inputs
    ctx.save_for_backward(weight, *state)
    ctx.arguments = (mode, out_features, in_features, nested_blocksize)
    ctx.state_count = len(state)


def _dequantize_linear_backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
    weight, *state = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = dequantize_linear_input_grad(grad_output, weight, state, *ctx.arguments)
    # The gradients mirror the inputs' structure: the state list gets a list of Nones (frozen tensors).
    return grad_x, None, [None] * ctx.state_count, None, None, None, None, None


dequantize_linear.register_autograd(_dequantize_linear_backward, setup_context=_setup_dequantize_linear_context)


def quantized_linear(layer: nn.Module, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
    """The output of a layer holding a quantized weight (a `QuantizedLinear`, or a `LoRALinear` over one)."""
    quantization: WeightQuantization = layer.quantization
    if quantization.mode == "fp8":
        return float8.float8_linear(layer, x, with_bias)
    return dequantize_linear(
        x,
        layer.weight,
        quantization.state_tensors(layer),
        layer.bias if with_bias else None,
        quantization.mode,
        layer.out_features,
        layer.in_features,
        getattr(layer, "nested_blocksize", None) or 0,
    )


def load_frozen_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Puts a checkpoint tensor on a frozen base layer, quantizing the weight if the layer stores it quantized."""
    quantization: WeightQuantization | None = getattr(module, "quantization", None)
    if name == "weight" and quantization is not None:
        quantization.store(module, tensor)
    else:
        setattr(module, name, nn.Parameter(tensor, requires_grad=False))


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new_module)


class QuantizedLinear(nn.Module):
    """A frozen `nn.Linear` whose weight is kept quantized (see the module docstring for the storage).

    Built from an `nn.Linear` on the meta device it waits for `load_checkpoint_tensor`; built from a loaded one it
    quantizes that weight at once."""

    def __init__(self, linear: nn.Linear, quantization: WeightQuantization) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.quantization = quantization
        # Until the checkpoint tensor arrives, `weight` is a (out, in) placeholder so the loader's shape check holds.
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        if not linear.weight.is_meta:
            quantization.store(self, linear.weight.detach())

    def load_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> None:
        load_frozen_tensor(self, name, tensor)

    def dequantized_weight(self) -> torch.Tensor:
        return self.quantization.dequantize(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.quantization.mode}"


def quantize_model(
    model: nn.Module, mode: str, compute_dtype: torch.dtype = torch.bfloat16, double_quant: bool = True
) -> None:
    """Replaces every `nn.Linear` except the output head by a frozen `QuantizedLinear` in `mode` (one of
    QUANTIZE_MODES). Call it on the meta model before loading (weights are quantized as they load), then
    `apply_lora`, before or after loading, wraps the quantized layers."""
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"--quantize {mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")
    if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ConfigError(f"quantization compute dtype {compute_dtype}: choose bfloat16, float16 or float32")
    quantization = WeightQuantization(mode, compute_dtype, double_quant)
    unaligned: list[str] = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.rpartition(".")[2] not in OUTPUT_HEAD_NAMES:
            if mode == "fp8" and not float8.aligned(module.in_features, module.out_features):
                unaligned.append(f"{name} ({module.out_features} x {module.in_features})")
                continue
            replace_module(model, name, QuantizedLinear(module, quantization))
    message = (
        f"--quantize fp8: {len(unaligned)} layers keep the compute dtype, float8 matrix multiplies need sizes "
        f"divisible by {float8.FLOAT8_ALIGNMENT}: {', '.join(unaligned[:3])}{', ...' if len(unaligned) > 3 else ''}"
    )
    if unaligned and message not in _WARNED:  # the memory estimate quantizes a meta copy first: say it once
        _WARNED.add(message)
        logging.getLogger("litft").warning(message)


def logical_parameter_count(model: nn.Module) -> int:
    """Parameters as the model defines them: a quantized weight counts in_features x out_features, not the
    number of packed storage elements it occupies."""
    total = 0
    seen: set[int] = set()  # tied weights (input and output embeddings) count once
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            if name == "weight_transposed":  # a float8 base's second copy of the same weight
                continue
            if name == "weight" and getattr(module, "quantization", None) is not None:
                total += module.in_features * module.out_features
            else:
                total += parameter.numel()
    return total
