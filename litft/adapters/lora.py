"""LoRA, rsLoRA and DoRA adapters on the linear layers of a model, replaced in place.

A `LoRALinear` takes the place of a targeted `nn.Linear` (or `QuantizedLinear`) and keeps the base layer's tensors
under their Hugging Face names (`...q_proj.weight`, `...q_proj.bias`), so a base checkpoint loads with no renaming.
Its adapter tensors are named as PEFT names them (`...q_proj.lora_A.weight`, `...q_proj.lora_B.weight`,
`...q_proj.lora_magnitude_vector` for DoRA), so exporting an adapter only adds PEFT's `base_model.model.` prefix.

`apply_lora` works in either order with loading:
  - on a loaded model: the adapter parameters are created and initialized at once, on the weight's device;
  - on the meta model, as the `prepare` step of `litft.checkpoint.load_model`: a layer's adapter parameters are
    created when the loader hands it its weight (DoRA's magnitude needs that weight), on the same device.
Either way step 0 computes exactly the base model: A is Kaiming-uniform (as PEFT), B is zero.

Adapter parameters are float32 whatever the base dtype (PEFT's default too): the optimizer updates small values
precisely and merging stays exact. LoRA's forward computes in the activations' dtype, casting the small adapter
matrices (not x; a compiled block casts all of its adapters at once per call, `litft.adapters.adapter_copies`);
DoRA's update computes in float32.

Layers that read the same input (q, k, v; gate, up) compute together when the model asks them to
(`litft.models.common.project` -> `LoRALinear.forward_together` -> `litft.adapters.lora_projections`): one read of
x for all their adapters, the additions inside the base GEMMs. Each layer keeps its own parameters and names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from litft.adapters import lora_gated_down
from litft.adapters.lora_projections import forward_joined, forward_together
from litft.adapters.quantization import (
    OUTPUT_HEAD_NAMES,
    QuantizedLinear,
    load_frozen_tensor,
    quantized_linear,
    replace_module,
)
from litft.errors import ConfigError

ADAPTER_DTYPE = torch.float32
# Short target names -> the module names they hit in each family (Llama/Gemma, Phi-3's fused layers, GPT-NeoX,
# Mixtral's experts). gate, up and down hit every expert's projections too; a router is never a target.
TARGET_MODULE_NAMES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj", "qkv_proj", "query_key_value"),
    "k": ("k_proj", "qkv_proj", "query_key_value"),
    "v": ("v_proj", "qkv_proj", "query_key_value"),
    "o": ("o_proj", "dense"),
    "gate": ("gate_proj", "gate_up_proj", "w1"),
    "up": ("up_proj", "gate_up_proj", "dense_h_to_4h", "w3"),
    "down": ("down_proj", "dense_4h_to_h", "w2"),
    "lm_head": OUTPUT_HEAD_NAMES,
}
ALL_LINEAR = "all-linear"


@dataclass
class LoRAConfig:
    """Low-rank adapter settings.

    Args:
        rank: Rank r of the update B @ A added to each targeted weight.
        alpha: The update is scaled by alpha / rank (alpha / sqrt(rank) with rslora).
        dropout: Dropout probability on the adapter's input (0 disables it).
        targets: Layers to adapt: any of q, k, v, o, gate, up, down, lm_head; `all-linear` (every linear layer
            except the output head); or module-name suffixes such as `q_proj` or `mlp.down_proj`. In a mixture
            of experts gate, up and down (and `all-linear`) take every expert's; its router is never adapted. A list
            (`[q,v]`) or one comma-separated string (`q,v`, `all-linear`).
        rslora: Rank-stabilized LoRA: scale by alpha / sqrt(rank).
        dora: DoRA: learn a per-output-row magnitude on top of the LoRA direction update.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=lambda: ["q", "k", "v", "o"])
    rslora: bool = False
    dora: bool = False

    def __post_init__(self) -> None:
        # `--lora.targets q,v` and `targets: all-linear` in a YAML file, as well as lists.
        if isinstance(self.targets, str):
            self.targets = [name.strip() for name in self.targets.split(",") if name.strip()]

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def validate(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"--lora.rank {self.rank}: must be a positive integer")
        if not self.alpha > 0:
            raise ConfigError(f"--lora.alpha {self.alpha}: must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--lora.dropout {self.dropout}: must be in [0, 1)")
        if not self.targets:
            raise ConfigError(f"--lora.targets is empty: name at least one of {', '.join(TARGET_MODULE_NAMES)}")


class LoRALinear(nn.Module):
    """A frozen base linear layer plus a trainable low-rank update:

        y = base(x) + B(A(dropout(x))) * scaling                       (LoRA, rsLoRA)
        y = m / ||W + scaling * B A||_row * (W x + B A x * scaling) + b   (DoRA, the norm detached as in the paper)

    The base is an `nn.Linear` or a `QuantizedLinear`; its tensors (and quantization state) move onto this layer
    under their own names."""

    def __init__(self, base: nn.Linear | QuantizedLinear, config: LoRAConfig) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.quantization = getattr(base, "quantization", None)
        self.nested_blocksize = getattr(base, "nested_blocksize", None)
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        for name, buffer in base.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        for name, parameter in base.named_parameters(recurse=False):  # a float8 base's transposed copy
            if name not in ("weight", "bias"):
                setattr(self, name, nn.Parameter(parameter.detach(), requires_grad=False))
        self.rank = config.rank
        self.scaling = config.scaling
        self.use_dora = config.dora
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A: nn.Linear | None = None
        self.lora_B: nn.Linear | None = None
        self.lora_magnitude_vector: nn.Parameter | None = None
        # False under compilers that cannot trace the grouped operators (thunder): see `forward_together`.
        self.compute_together = True
        # True once `join_frozen_weights` has given this layer's group (q, k, v) one base GEMM.
        self.joined_base = False
        # Set by `litft.adapters.adapter_copies` for a block call: this layer's place in the group it computes
        # with, (position, size); its group's stacked A and diag(B_1, ...) (first layer only) and its B, in the
        # activations' dtype.
        self.prepared_group: tuple[int, int] | None = None
        self.prepared_lora_a: torch.Tensor | None = None
        self.prepared_lora_b: torch.Tensor | None = None
        self.prepared_update_blocks: torch.Tensor | None = None
        if not self.weight.is_meta:
            self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        """Creates the adapter on the base weight's device: A Kaiming-uniform, B zero, DoRA's magnitude = ||W||_row."""
        device = self.weight.device
        self.lora_A = nn.Linear(self.in_features, self.rank, bias=False, device=device, dtype=ADAPTER_DTYPE)
        self.lora_B = nn.Linear(self.rank, self.out_features, bias=False, device=device, dtype=ADAPTER_DTYPE)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.use_dora:
            with torch.no_grad():
                magnitude = self.base_weight().to(ADAPTER_DTYPE).norm(dim=1)  # (out,)
            self.lora_magnitude_vector = nn.Parameter(magnitude)

    def load_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> None:
        load_frozen_tensor(self, name, tensor)
        if name == "weight" and self.lora_A is None:
            self.reset_adapter_parameters()

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight (out, in), dequantized if it is stored quantized."""
        return self.weight if self.quantization is None else self.quantization.dequantize(self)

    def _base_forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        if self.quantization is not None:
            return quantized_linear(self, x, with_bias)
        return nn.functional.linear(x, self.weight, self.bias if with_bias else None)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out, in), in the adapter dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @staticmethod
    def forward_together(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor] | None:
        """The outputs of `layers` that read the same `x` (q, k, v; gate, up): the LoRA layers among them in two
        opaque operators that read x once for every adapter and write each full-size tensor once
        (`litft.adapters.lora_projections`), the others (not adapted, DoRA, a float8 base) on
        their own; None where no layer can join (thunder): the caller then calls each layer."""
        return forward_together(x, layers)

    @staticmethod
    def forward_joined(x: torch.Tensor, layers: Sequence[nn.Module]) -> torch.Tensor | None:
        """The outputs of `layers` side by side in one tensor where they compute as one base GEMM with their
        adapters (q, k, v with joined frozen weights); None otherwise (the caller then uses `forward_together`)."""
        return forward_joined(x, layers)

    @staticmethod
    def gated_down(gate: torch.Tensor, up: torch.Tensor, layer: nn.Module, activation: str) -> torch.Tensor | None:
        """down(act(gate) * up) for this layer as a gated MLP's down projection, in one operator whose backward
        never writes act(gate) * up to memory (`litft.adapters.lora_gated_down`); None where it does not apply (the
        caller then calls the layer on the product)."""
        return lora_gated_down.gated_down(gate, up, layer, activation)

    @staticmethod
    def gated_mlp(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module, activation: str
                  ) -> torch.Tensor | None:
        """down(act(gate(x)) * up(x)) with this class's layers, h = act(gate) * up formed with gate and up in
        their GEMM's kernel (`litft.adapters.lora_gated_down.gated_mlp`); None where it does not apply (the caller
        then computes gate and up, and `gated_down`)."""
        return lora_gated_down.gated_mlp(x, gate, up, down, activation)

    @staticmethod
    def experts_together(
        experts: nn.ModuleList, x: torch.Tensor, ends: torch.Tensor, row_weights: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """A mixture's SwiGLU experts on their runs of `x`'s rows (sorted by expert, expert e's run ending at
        `ends[e]`, on the device), weighted by `row_weights`, through grouped GEMMs (`litft.adapters.lora_experts`;
        under --compile the output's two summands); None where that does not apply (the caller then runs each
        expert)."""
        from litft.adapters.lora_experts import experts_together

        return experts_together(experts, x, ends, row_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        together = forward_together(x, [self])  # the usual path: see `forward_together`
        if together is not None:
            return together[0]
        # On its own (DoRA, a float8 base, thunder):
        result = self._base_forward(x)  # (..., out)
        if self.use_dora:
            return self._dora_forward(x, result)
        # The adapter computes in the activations' dtype: casting the two small matrices costs far less than a
        # float32 copy of x, and the float32 parameters keep the optimizer's updates exact. The scaling applies to
        # the rank-sized intermediate.
        low_rank = nn.functional.linear(self.lora_dropout(x), self.lora_A.weight.to(x.dtype)) * self.scaling
        update_weight = self.lora_B.weight.to(x.dtype)  # (out, rank)
        # Compiled, the add fuses into the next elementwise kernel (SwiGLU, the residual add). An addmm would be
        # lowered to a copy of the base output and a rank-deep GEMM that reads and writes it again: measured 1.6x
        # slower than this on llama-8b's MLP projections (benchmarks/NOTES.md, section 7). A quantized base's output
        # comes from a custom operator, which autograd forbids to modify in place.
        if torch.compiler.is_compiling() or self.quantization is not None:
            return result + nn.functional.linear(low_rank, update_weight)
        # Eager, the rank-deep GEMM accumulates into the base output in place: one pass over it, no extra kernel.
        # The base output is a fresh tensor that autograd has not saved, so writing into it is safe. In-place
        # operations are not autocast: the operands take the output's dtype here.
        flat = result.view(-1, self.out_features)  # (tokens, out)
        flat.addmm_(low_rank.reshape(-1, self.rank).to(result.dtype), update_weight.to(result.dtype).t())
        return result

    def _dora_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        dropped = self.lora_dropout(x)
        adapter_dtype = self.lora_A.weight.dtype
        lora_result = self.lora_B(self.lora_A(dropped.to(adapter_dtype))) * self.scaling  # (..., out)
        with torch.no_grad():
            weight = self.base_weight().to(adapter_dtype)
            weight_norm = (weight + self.delta_weight()).norm(dim=1)  # (out,)
        magnitude_scale = self.lora_magnitude_vector / weight_norm  # (out,)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_without_bias = result if self.bias is None else result - self.bias
        else:
            # Dropout gave the adapter a different input; DoRA rescales the base on that same input.
            base_without_bias = self._base_forward(dropped, with_bias=False)
        dora_result = (magnitude_scale - 1) * base_without_bias + magnitude_scale * lora_result
        return (result + dora_result).to(result.dtype)

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the adapter folded in, float32 (out, in)."""
        with torch.no_grad():
            weight = self.base_weight().float() + self.delta_weight().float()
            if self.use_dora:
                weight = (self.lora_magnitude_vector.float() / weight.norm(dim=1)).unsqueeze(1) * weight
        return weight

    def extra_repr(self) -> str:
        kind = "dora" if self.use_dora else "lora"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind} rank={self.rank}"


def is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or isinstance(module, QuantizedLinear)


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def _matches_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The names of the linear modules that `targets` (short names, `all-linear`, module-name suffixes) hit."""
    linear_names = [name for name, module in model.named_modules() if is_linear(module)]
    chosen: set[str] = set()
    for target in targets:
        if target == ALL_LINEAR:
            hits = [name for name in linear_names if _leaf(name) not in OUTPUT_HEAD_NAMES]
        elif target in TARGET_MODULE_NAMES:
            hits = [name for name in linear_names if _leaf(name) in TARGET_MODULE_NAMES[target]]
        else:
            hits = [name for name in linear_names if _matches_suffix(name, target)]
        if not hits:
            available = sorted({_leaf(name) for name in linear_names})
            raise ConfigError(
                f"--lora.targets {target!r} matches no linear layer of {type(model).__name__}; use "
                f"{', '.join(TARGET_MODULE_NAMES)}, {ALL_LINEAR} or a module name ({', '.join(available)})"
            )
        chosen.update(hits)
    return [name for name in linear_names if name in chosen]


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Replaces the targeted linear layers of `model` by `LoRALinear`s in place, freezes every other parameter and
    returns the replaced module names. Works on a loaded model and on the meta model before loading."""
    config.validate()
    return apply_lora_to_modules(model, resolve_targets(model, config.targets), config)


def apply_lora_to_modules(model: nn.Module, module_names: list[str], config: LoRAConfig) -> list[str]:
    """`apply_lora` for an explicit list of module names (used when loading an adapter that lists its modules)."""
    if any(isinstance(module, LoRALinear) for module in model.modules()):
        raise ValueError("the model already has LoRA layers; merge or rebuild it before applying LoRA again")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name in module_names:
        base = model.get_submodule(name)
        if base.weight.is_meta and tied and _leaf(name) in OUTPUT_HEAD_NAMES:
            raise ConfigError(
                f"--lora.targets: {name} shares its weight with the input embeddings; apply LoRA to it after loading"
            )
        replace_module(model, name, LoRALinear(base, config))
    return list(module_names)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def set_compute_together(model: nn.Module, enabled: bool) -> None:
    """Whether the LoRA layers of `model` that share an input compute together (the default) or one by one (under
    thunder, which cannot trace the grouped operators; or to compare the two)."""
    for layer in lora_modules(model).values():
        layer.compute_together = enabled


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Runs every LoRA layer of `model` as its frozen base layer until the block exits: the model computes exactly
    its base weights (DoRA's magnitude included), without a copy of them (DPO's reference model)."""
    layers = list(lora_modules(model).values())
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to disable")
    # An instance attribute shadows the class's `forward` for the block's duration, so the enabled path pays
    # nothing for this switch (no flag to test on every call).
    for layer in layers:
        layer.forward = layer._base_forward
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under their litft (= Hugging Face module) names, e.g.
    `model.layers.0.self_attn.q_proj.lora_A.weight`."""
    state: dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model).items():
        if module.lora_A is None:
            raise ValueError(f"{name}: LoRA parameters were never created; load the base weights first")
        state[f"{name}.lora_A.weight"] = module.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = module.lora_B.weight.detach()
        if module.use_dora:
            state[f"{name}.lora_magnitude_vector"] = module.lora_magnitude_vector.detach()
    return state


def merge_lora_(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Folds every `LoRALinear` into a plain `nn.Linear` in place: the sum is formed in float32 and cast once, to
    `dtype` or else to the base weight's (compute) dtype."""
    for name, module in lora_modules(model).items():
        weight = module.merged_weight()
        target_dtype = dtype or (module.quantization.compute_dtype if module.quantization else module.weight.dtype)
        merged = nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta", dtype=target_dtype
        )
        merged.weight = nn.Parameter(weight.to(target_dtype), requires_grad=False)
        if module.bias is not None:
            merged.bias = nn.Parameter(module.bias.detach().to(target_dtype), requires_grad=False)
        replace_module(model, name, merged)
    from litft.adapters.lora_experts import drop_stacked_adapters

    drop_stacked_adapters(model)  # a mixture's stacked expert adapters, merged above through each expert's slice
