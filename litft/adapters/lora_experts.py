"""A mixture's LoRA experts computed together, through grouped GEMMs.

Run one by one, a 128-expert layer is ~400 small LoRA projections, each several kernels and some Python. Together,
with the tokens already sorted by expert (`litft.models.llama.SparseMoE`), one grouped GEMM (`torch._grouped_mm`:
a matrix per expert, each applied to its own run of rows) does each of these for all experts at once:

    gate | up = x @ [W_gate; W_up]^T + scaling * (x @ A^T) @ B^T      (A: gate's and up's stacked, 2r rows)
    y         = h @ W_down^T + scaling * (h @ A_down^T) @ B_down^T,   h = silu(gate) * up * router weight

For that, `lay_experts_back_to_back` puts every expert's frozen gate and up weights in one (experts, 2I, C) storage
and the down weights in one (experts, C, I), each expert's `weight` staying its own parameter under its own name,
a view into it (as `lora_projections.join_frozen_weights` does for q, k and v). It also stacks the adapters
(`stack_expert_adapters`): each projection's A and B of all experts become two parameters, (E, r, in) and
(E, out, r), and each expert's `lora_A` / `lora_B` a slice of them, so that the optimizer, autograd and these GEMMs
handle 6 adapter tensors per layer instead of 768 (saved adapters keep their per-expert names). Autograd
differentiates the grouped GEMMs; the frozen weights take no gradient.

The host never waits for the GPU here: the runs' ends come as a device tensor (`SparseMoE`), and what the GEMMs
read of the experts (the checks, the laid-out storage, the stacked adapters) is found once and kept on the experts'
ModuleList (`_plan`), found again only when the experts' tensors or their switches change.

Quantized experts (QLoRA): their NF4 tensors (packed values, block scales, group scales, offsets) are laid back to
back the same way, and each grouped GEMM dequantizes all experts' weights of its kind in one kernel launch into one
buffer, in the forward and again in the backward, so that no layer's dequantized experts wait for its backward.
Given few rows (decoding), each row has only its own expert's weights dequantized, and multiplies by them in
batched products (`_rows_one_by_one`).

Under FSDP2 the experts' weights cannot lie back to back: FSDP2 gives each parameter memory of its own when it
gathers a block. The grouped GEMMs then read them copied together, once per call, forward and again backward (one
copy of 1.2 GB per Qwen3-30B-A3B layer and pass, ~0.4 ms on an H200, where one expert after another ran the layer
~2.5x slower), and 4-bit experts have their packed tensors copied together for the one-launch dequantization.

Plain frozen experts (no adapters: generation, or LoRA that leaves the experts out; full precision or 4-bit) are
laid out and computed the same way, without the adapters' products.

Where this does not apply (on CPU unless `ON_CPU`; DoRA, adapters switched off, a width the grouped GEMM cannot
align), `experts_together` returns None and the experts run one by one,
computing the same thing (tests/test_moe.py compares the two).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from litft.adapters.lora_projections import back_to_back, dropout_probability

# torch._grouped_mm's operands: 16-byte aligned rows, i.e. every reduction and output width a multiple of 8
# elements in 16-bit floats (an adapter's rank is padded with zeros to one).
ALIGNMENT = 8
ENABLED = True  # False: every expert on its own (the A/B of benchmarks/bench.py --experts_one_by_one)
# torch's grouped GEMM also runs on CPU in recent releases (slowly, and in float32 too): True lets the CPU tests take
# this path; the environment variable sets it in processes a test starts (two-process DDP / FSDP2 runs).
ON_CPU = os.environ.get("LITFT_GROUPED_EXPERTS_ON_CPU") == "1"
# Set on a mixture's experts ModuleList (in its __dict__, not as state) by `compile_blocks`: under --compile the
# weighted SwiGLU runs compiled, its forward one kernel and its backward another, instead of seven eager passes
# over (rows, I) tensors each way, and the output's two summands are added where the mixture sums each token's
# rows (`litft.models.llama.gather_sum`). The mixture itself stays eager (its routing breaks a graph).
COMPILE_ELEMENTWISE = "compile_elementwise"
# False: eager under --compile too (the A/B of benchmarks/bench.py --experts_elementwise_eager).
COMPILED_ELEMENTWISE = True
# Set on a mixture's experts ModuleList (in its __dict__) where they are plain linear layers laid back to back: the
# function that computes them together. (LoRA experts are found through their class, `LoRALinear.experts_together`.)
PLAIN_EXPERTS_TOGETHER = "experts_together"


def _projections(experts: nn.ModuleList) -> list[list[nn.Module]]:
    """Each expert's (gate, up, down) layers."""
    return [[getattr(expert, name) for name in expert.names] for expert in experts]


def _plain(flat: list[nn.Module]) -> bool:
    """Whether the layers are all frozen experts without adapters or bias, of one kind: `nn.Linear`, or
    `QuantizedLinear` (a 4-bit base loaded for generation)."""
    from litft.adapters.quantization import QuantizedLinear

    kinds = {type(layer) for layer in flat}
    return len(kinds) == 1 and kinds <= {nn.Linear, QuantizedLinear} and all(
        layer.bias is None and not layer.weight.requires_grad for layer in flat
    )


def lay_experts_back_to_back(model: nn.Module) -> int:
    """Stacks the expert adapters of every mixture of LoRA experts in `model` (`stack_expert_adapters`) and lays
    their frozen weights back to back (see the module's docstring); returns how many mixtures it laid out. Mixtures
    of frozen experts without adapters (plain linear layers: generation, or LoRA that leaves the experts out) are
    laid out too and compute together the same way, minus the adapters. Mixtures whose experts are neither all LoRA
    nor all plain, or whose weights are not all full-precision ones of one dtype and device or NF4 ones of one
    format, or that train their weights (full fine-tuning), stay as they are."""
    from litft.adapters.lora import LoRALinear

    laid = 0
    for experts in _mixtures(model):
        stack_expert_adapters(experts)
        gate_up_order, downs = _kinds(_projections(experts))
        flat = gate_up_order + downs
        plain = _plain(flat)
        if not plain and not all(type(layer) is LoRALinear for layer in flat):
            continue
        if all(getattr(layer, "quantization", None) is None for layer in flat):
            weights = [layer.weight for layer in flat]
            if any(weight.requires_grad or weight.is_meta for weight in weights):
                continue
            if len({(weight.dtype, weight.device) for weight in weights}) > 1:
                continue
        elif not all(_can_lay_quantized(ordered) for ordered in (gate_up_order, downs)):
            continue
        for ordered in (gate_up_order, downs):
            _lay(ordered, _tensor_names(ordered[0]))
        if plain:  # how the mixture finds this module (`litft.models.llama.experts_together`)
            experts.__dict__[PLAIN_EXPERTS_TOGETHER] = experts_together
        laid += 1
    return laid


def stack_mixture_adapters(model: nn.Module) -> int:
    """`stack_expert_adapters` for every mixture of `model` (without laying the frozen weights out, which FSDP2
    would undo); returns how many it stacked."""
    return sum(stack_expert_adapters(experts) for experts in _mixtures(model))


def drop_stacked_adapters(model: nn.Module) -> None:
    """Removes the stacked expert adapters of `model`'s mixtures once nothing reads them (their LoRA layers merged
    into plain ones), so that a merged model's state holds no adapter tensors."""
    for experts in _mixtures(model):
        for name in _stacked_adapters(experts) or ():
            del experts._parameters[name]
        experts.__dict__.pop("_grouped_plan", None)


def _mixtures(model: nn.Module) -> list[nn.ModuleList]:
    """The experts' ModuleList of each mixture in `model` (experts that name their projections)."""
    found = []
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, nn.ModuleList) and all(hasattr(expert, "names") for expert in experts):
            found.append(experts)
    return found


class ExpertAdapterSlice:
    """An expert LoRA layer's `lora_A` or `lora_B` once its mixture's adapters are stacked: `weight` is the expert's
    slice of the stacked parameter (a view: its gradient lands in the stacked one), looked up at each use so that a
    parameter replaced on the ModuleList (a reload that assigns) is followed. (Only plain LoRA layers are stacked,
    which read `weight`; DoRA's, which call their factors as layers, keep them.)"""

    def __init__(self, experts: nn.ModuleList, name: str, index: int) -> None:
        self.experts, self.name, self.index = experts, name, index

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.experts, self.name)[self.index]

    def __repr__(self) -> str:
        return f"ExpertAdapterSlice({self.name}[{self.index}])"


def stacked_adapter_name(projection: str, factor: str) -> str:
    """The experts' ModuleList's parameter holding every expert's `factor` ("lora_A", "lora_B") of `projection`."""
    return f"{projection}_{factor}"


def stack_expert_adapters(experts: nn.ModuleList) -> bool:
    """Stacks a mixture's expert adapters: for each projection (gate, up, down), every expert's A into one (E, r, in)
    parameter and every B into one (E, out, r), registered on the experts' ModuleList (`gate_proj_lora_A`, ...), each
    expert's `lora_A` / `lora_B` becoming an `ExpertAdapterSlice` of them. The values do not change, nor the names
    an adapter is saved and loaded under (`adapter_state_dict` reads each expert's slice). What changes is how many
    tensors training handles: a 128-expert layer's 768 adapter tensors become 6, and the optimizer, the autograd
    engine and the grouped GEMMs' stacking each paid per tensor on the host (~26 ms per Qwen3-MoE step in the
    optimizer alone; benchmarks/NOTES.md, section 25). False where the experts are not all plain LoRA layers with
    adapters alike (DoRA, meta or mismatched adapters) or are stacked already."""
    from litft.adapters.lora import LoRALinear

    layers = _projections(experts)
    flat = [layer for projections in layers for layer in projections]
    if not all(type(layer) is LoRALinear and not layer.use_dora for layer in flat):
        return False
    if any(not isinstance(getattr(layer, factor), nn.Linear) for layer in flat for factor in ("lora_A", "lora_B")):
        return False  # not created yet, or stacked already
    columns = []
    for position, projection in enumerate(experts[0].names):
        column = [projections[position] for projections in layers]
        for factor in ("lora_A", "lora_B"):
            weights = [getattr(layer, factor).weight for layer in column]
            if any(weight.is_meta for weight in weights):
                return False
            if len({(weight.shape, weight.dtype, weight.device, weight.requires_grad) for weight in weights}) > 1:
                return False
            columns.append((projection, factor, column, weights))
    for projection, factor, column, weights in columns:
        name = stacked_adapter_name(projection, factor)
        stacked = torch.stack([weight.detach() for weight in weights])  # (E, r, in) or (E, out, r)
        experts.register_parameter(name, nn.Parameter(stacked, requires_grad=weights[0].requires_grad))
        for index, layer in enumerate(column):
            del layer._modules[factor]  # the nn.Linear; a plain attribute takes its place
            setattr(layer, factor, ExpertAdapterSlice(experts, name, index))
    return True


def _stacked_adapters(experts: nn.ModuleList) -> list[str] | None:
    """The names of the stacked adapter parameters in the order the grouped GEMMs read them (A of gate, up, down;
    B of gate, up, down), or None where the adapters are the experts' own."""
    gate, up, down = experts[0].names
    names = [stacked_adapter_name(projection, factor)
             for factor in ("lora_A", "lora_B") for projection in (gate, up, down)]
    return names if all(name in experts._parameters for name in names) else None


def _kinds(layers: list[list[nn.Module]]) -> tuple[list[nn.Module], list[nn.Module]]:
    """The experts' layers in the order they lie back to back: gate and up of each expert side by side (so that
    together they read as (E, 2I, C)), then every down (E, C, I)."""
    return [layer for gate, up, _ in layers for layer in (gate, up)], [down for _, _, down in layers]


# A 4-bit weight's tensors, each laid back to back across a mixture's experts: the packed values, the block scales
# and, with double quantization, the groups' scales and the offset (one per weight).
QUANTIZED_TENSORS = ("weight", "weight_absmax", "weight_nested_absmax", "weight_offset")


def _tensor_names(layer: nn.Module) -> tuple[str, ...]:
    quantization = getattr(layer, "quantization", None)  # a plain linear layer has none
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
        joint = _copied_together(ordered, name)
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


def _nf4_joint(ordered: list[nn.Module], copied: bool = False) -> list[torch.Tensor] | None:
    """`ordered`'s laid-out NF4 tensors (packed values, then the dequantization's state in its order: block codes,
    group scales, table, offsets) as flat joint tensors for one launch; None where they cannot go in one. `copied`:
    each tensor copied together from the layers' own (they do not lie back to back; see `_can_lay_quantized`)."""
    from litft.adapters import nf4_dequantize

    first = ordered[0]
    if first.quantization.mode != "bnb.nf4":
        return None
    read = _copied_together if copied else _joint
    joint = [read(ordered, name) for name in _tensor_names(first)]
    if any(tensor is None for tensor in joint) or not nf4_dequantize.can_dequantize(
        joint[0], first.out_features, first.in_features
    ):
        return None
    if first.quantization.double_quant:
        joint = [joint[0], joint[1], joint[2], first.weight_nested_code, joint[3]]
    return joint


def _copied_together(ordered: list[nn.Module], name: str) -> torch.Tensor:
    """The layers' tensors `name`, read now, copied into one flat tensor in their order."""
    return torch.cat([getattr(layer, name).reshape(-1) for layer in ordered])


def _weights_copied_together(ordered: list[nn.Module], shape: tuple[int, int, int]) -> torch.Tensor:
    return _copied_together(ordered, "weight").view(shape)


def _dequantized_copied_together(
    ordered: list[nn.Module], shape: tuple[int, int, int], dtype: torch.dtype
) -> torch.Tensor:
    return _dequantized(ordered, _nf4_joint(ordered, copied=True), shape, dtype)


def _dequantized_rows(
    ordered: list[nn.Module], joint: list[torch.Tensor], shape: tuple[int, int, int], dtype: torch.dtype,
    experts: torch.Tensor,
) -> torch.Tensor:
    """The laid-out 4-bit weights of the experts `experts` (a device tensor of expert indices, one per row, repeats
    allowed) in `dtype`, as (len(experts), *shape[1:]): each joint tensor's slices of those experts gathered, then
    one launch (`_dequantized`) over them."""
    expert_count = shape[0]
    # Each tensor's share of those experts; with double quantization the group scales' code table (`_nf4_joint`'s
    # fourth) is one for all experts, and stays whole.
    shared = 3 if len(joint) == 5 else None
    chosen = [tensor if index == shared else tensor.view(expert_count, -1).index_select(0, experts).view(-1)
              for index, tensor in enumerate(joint)]
    per_expert = len(ordered) // expert_count  # gate and up, or down
    return _dequantized(ordered, chosen, (len(experts), *shape[1:]), dtype, weight_count=per_expert * len(experts))


def _dequantized(
    ordered: list[nn.Module], joint: list[torch.Tensor] | None, shape: tuple[int, int, int], dtype: torch.dtype,
    weight_count: int | None = None,
) -> torch.Tensor:
    """`ordered`'s 4-bit weights as a (shape) tensor in `dtype`: one launch over their `joint` tensors
    (`_nf4_joint`), or one weight at a time where there are none."""
    from litft.adapters import nf4_dequantize
    from litft.adapters.quantization import BLOCKSIZE_4BIT

    if joint is None:
        return _dequantized_each(ordered, shape, dtype)
    first = ordered[0]
    out = nf4_dequantize.dequantize_nf4(
        joint[0], joint[1:], first.out_features, first.in_features, BLOCKSIZE_4BIT,
        getattr(first, "nested_blocksize", None) or 0, dtype, weight_count=weight_count or len(ordered),
    )
    return out.view(shape)


def _applies(x: torch.Tensor) -> bool:
    """Whether the grouped GEMMs can take this input (the experts themselves: `_plan`)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.is_cuda:
        if x.dtype not in (torch.bfloat16, torch.float16):
            return False
    elif not (ON_CPU and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32)):
        return False
    return not torch.compiler.is_compiling()


def _layers_apply(layers: list[list[nn.Module]], dtype: torch.dtype) -> bool:
    """Whether every expert's projections are plain LoRA layers alike (rank, scaling, adapter dropout, storage
    mode), adapters on, without bias, whose frozen weights compute in `dtype`, at widths the grouped GEMM can
    align; or all plain linear layers, frozen, without bias, in `dtype`."""
    from litft.adapters.lora import LoRALinear

    flat = [layer for projections in layers for layer in projections]
    first = flat[0]
    if type(first) is not LoRALinear:
        quantization = getattr(first, "quantization", None)
        return _plain(flat) and (
            quantization.compute_dtype == dtype and all(layer.quantization == quantization for layer in flat)
            if quantization is not None else all(layer.weight.dtype == dtype for layer in flat)
        ) and all(size % ALIGNMENT == 0 for size in (first.in_features, first.out_features))
    mode = first.quantization.mode if first.quantization is not None else None
    for layer in flat:
        if type(layer) is not LoRALinear or layer.use_dora:
            return False
        if "forward" in layer.__dict__:  # adapters switched off
            return False
        if dropout_probability(layer) != dropout_probability(first):  # one adapter dropout for all
            return False
        if layer.rank != first.rank or layer.scaling != first.scaling or layer.bias is not None:
            return False
        if layer.weight.requires_grad or type(layer.weight) is not nn.Parameter:
            return False
        quantization = layer.quantization
        if (quantization.mode if quantization is not None else None) != mode:
            return False
        weight_dtype = quantization.compute_dtype if quantization is not None else layer.weight.dtype
        if weight_dtype != dtype:
            return False
    gate = layers[0][0]
    return all(size % ALIGNMENT == 0 for size in (gate.in_features, gate.out_features))  # ranks are padded


class _Plan:
    """What a mixture's grouped GEMMs read of its experts, found once and kept on the experts' ModuleList: a
    128-expert layer has 384 LoRA layers, and walking them on every call (checks, laid-out storage, the adapter
    parameters) cost the host more than a millisecond per layer and step."""

    def __init__(self, layers: list[list[nn.Module]], dtype: torch.dtype, stacked: list[str] | None) -> None:
        gate, _, down = layers[0]
        self.expert_count = len(layers)
        self.adapted = hasattr(gate, "lora_A")  # LoRA experts; else plain ones, without adapters
        self.quantized = getattr(gate, "quantization", None) is not None
        self.rank, self.scaling = (gate.rank, gate.scaling) if self.adapted else (0, 0.0)
        # The adapters' dropout while training (the plan is found again when training switches: `_plan_key`).
        self.dropout = dropout_probability(gate) if self.adapted else 0.0
        gate_up_order, downs = _kinds(layers)
        gate_up_shape = (len(layers), 2 * gate.out_features, gate.in_features)
        down_shape = (len(layers), down.out_features, down.in_features)
        # Whether the plan keeps views of the weights' memory (laid back to back), which a new allocation under the
        # same parameters makes stale; otherwise it reads the weights anew at each call (FSDP2's gathered blocks).
        self.holds_views = True
        self.few_rows = None  # 4-bit experts: each row's own expert dequantized, where few rows come
        if self.quantized:  # dequantized anew in each call, forward and backward
            joints = [_nf4_joint(gate_up_order), _nf4_joint(downs)]
            if all(joint is not None for joint in joints):  # laid out: from tensors found here
                self.gate_up_weights = functools.partial(_dequantized, gate_up_order, joints[0], gate_up_shape, dtype)
                self.down_weights = functools.partial(_dequantized, downs, joints[1], down_shape, dtype)
                self.few_rows = (
                    functools.partial(_dequantized_rows, gate_up_order, joints[0], gate_up_shape, dtype),
                    functools.partial(_dequantized_rows, downs, joints[1], down_shape, dtype),
                )
            else:  # copied together first where one launch can take them, else one weight at a time
                self.holds_views = False
                together = all(_can_lay_quantized(ordered) for ordered in (gate_up_order, downs))
                dequantized = _dequantized_copied_together if together else _dequantized_each
                self.gate_up_weights = functools.partial(dequantized, gate_up_order, gate_up_shape, dtype)
                self.down_weights = functools.partial(dequantized, downs, down_shape, dtype)
        else:
            gate_up, down_weight = _joint(gate_up_order, "weight"), _joint(downs, "weight")
            if gate_up is not None and down_weight is not None:
                self.gate_up_weights = functools.partial(_same, gate_up.view(gate_up_shape))
                self.down_weights = functools.partial(_same, down_weight.view(down_shape))
            else:
                self.holds_views = False
                self.gate_up_weights = functools.partial(_weights_copied_together, gate_up_order, gate_up_shape)
                self.down_weights = functools.partial(_weights_copied_together, downs, down_shape)
        # The adapters: stacked (`stack_expert_adapters`), read by name at each call, or each expert's own,
        # stacked at each call. A (r, C) of gate, of up, of down (r, I); B (I, r), (I, r), (C, r).
        self.stacked = stacked
        self.adapters = None if stacked is not None or not self.adapted else [
            [layers[expert][index].lora_A.weight for expert in range(len(layers))] for index in range(3)
        ] + [[layers[expert][index].lora_B.weight for expert in range(len(layers))] for index in range(3)]

    def adapter_factors(self, experts: nn.ModuleList, dtype: torch.dtype) -> list[torch.Tensor]:
        """A of gate, up and down, B of gate, up and down, each (E, ...) in `dtype`."""
        if self.stacked is not None:
            return [getattr(experts, name).to(dtype) for name in self.stacked]
        return [_stack(tensors, dtype) for tensors in self.adapters]


def _plan_key(experts: nn.ModuleList, layers: list[list[nn.Module]], dtype: torch.dtype, addresses: bool) -> tuple:
    """What, changed, makes a mixture's plan stale: the dtype, whether adapters are switched off (for all layers
    at once, `litft.adapters.lora.adapters_disabled`), and the first and last experts' tensors and adapters
    (replaced together when a model moves, is sharded, re-laid, stacked or reloaded). The objects themselves,
    compared by identity, so that none of them can be freed and its id reused while the key holds it; and, where
    the plan holds views of them (`addresses`), where the frozen weights' memory is, which moves under the same
    objects when their data is replaced (`model.to(...)`; FSDP2 does at every gather)."""
    first, last = layers[0][0], layers[-1][-1]
    adapters = tuple(experts._parameters.get(name) for name in (_stacked_adapters(experts) or ()))
    if not adapters:
        adapters = (getattr(getattr(first, "lora_A", None), "weight", None),
                    getattr(getattr(last, "lora_B", None), "weight", None))
    memory = (first.weight.data_ptr(), last.weight.data_ptr()) if addresses else ()
    # training: whether an adapter dropout applies
    return (dtype, "forward" in first.__dict__, first.training, len(layers), *memory,
            *(getattr(layer, name, None) for layer in (first, last) for name in ("weight", "lora_A", "lora_B")),
            *adapters)


def _same_key(key: tuple, other: tuple) -> bool:
    """Tensors and modules by identity, the rest (dtype, flags, counts) by value."""
    return len(key) == len(other) and all(
        a is b if isinstance(a, (torch.Tensor, nn.Module)) or a is None else a == b for a, b in zip(key, other)
    )


def _plan(experts: nn.ModuleList, dtype: torch.dtype) -> _Plan | None:
    """The experts' plan for inputs of `dtype`, found again only where its key changed; None where the experts
    cannot compute together."""
    cached = experts.__dict__.get("_grouped_plan")  # outside nn.Module's registries: neither a submodule nor state
    if cached is not None and _same_key(_plan_key(experts, cached.layers, dtype, cached.addresses), cached.key):
        return cached.plan
    layers = _projections(experts)
    found = _Plan(layers, dtype, _stacked_adapters(experts)) if _layers_apply(layers, dtype) else None
    addresses = found is None or found.holds_views
    key = _plan_key(experts, layers, dtype, addresses)
    experts.__dict__["_grouped_plan"] = _CachedPlan(layers, key, found, addresses)
    return found


class _CachedPlan:
    def __init__(self, layers: list[list[nn.Module]], key: tuple, plan: _Plan | None, addresses: bool) -> None:
        self.layers, self.key, self.plan, self.addresses = layers, key, plan, addresses


def _stack(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.stack(list(tensors)).to(dtype)


def experts_together(
    experts: nn.ModuleList, x: torch.Tensor, ends: torch.Tensor, row_weights: torch.Tensor
) -> torch.Tensor | None:
    """Every expert's SwiGLU output for its run of `x`'s rows (x sorted by expert, expert e's rows ending at
    `ends[e]`, a device tensor), each row times its router weight (`row_weights`), as one (rows, C) tensor, through
    grouped GEMMs; under --compile (`COMPILE_ELEMENTWISE`) as its two summands (base, adapter), which the mixture
    adds as it sums each token's rows; None where that path does not apply (see the module's docstring)."""
    if not ENABLED or not _applies(x):
        return None
    plan = _plan(experts, x.dtype)
    if plan is None:
        return None
    # 4-bit experts given fewer rows than there are experts, without gradients (decoding): dequantizing each row's
    # own expert costs less than dequantizing them all. (With gradients the per-row weights would be kept for the
    # backward, up to a whole layer's experts in bf16 per layer: training dequantizes them all, twice, instead.)
    if plan.quantized and x.shape[0] < plan.expert_count and not torch.is_grad_enabled():
        return None if plan.few_rows is None else _rows_one_by_one(plan, experts, x, ends, row_weights)
    offsets = ends.to(torch.int32)
    if not plan.adapted:  # plain experts: the base GEMMs alone
        base = _FrozenGroupedProduct.apply(x, offsets, plan.gate_up_weights)  # (rows, 2I)
        h = weighted_swiglu(base, None, None, row_weights)  # (rows, I)
        return _FrozenGroupedProduct.apply(h, offsets, plan.down_weights)  # (rows, C)
    rank, scaling = plan.rank, plan.scaling
    dtype = x.dtype
    a_gate, a_up, a_down, b_gate, b_up, b_down = plan.adapter_factors(experts, dtype)
    aligned_rank = -(-rank // ALIGNMENT) * ALIGNMENT
    if aligned_rank != rank:  # e.g. rank 4: zero rows of A and zero columns of B add nothing, and align the operands
        a_gate, a_up, a_down = (F.pad(a, (0, 0, 0, aligned_rank - rank)) for a in (a_gate, a_up, a_down))
        b_gate, b_up, b_down = (F.pad(b, (0, aligned_rank - rank)) for b in (b_gate, b_up, b_down))
        rank = aligned_rank
    a_gate_up = torch.cat([a_gate, a_up], dim=1)  # (E, 2r, C)

    def grouped(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # rows @ weights[e]^T, per expert
        return torch._grouped_mm(rows, weights.transpose(1, 2), offs=offsets)

    base = _FrozenGroupedProduct.apply(x, offsets, plan.gate_up_weights)  # (rows, 2I)
    if plan.dropout:  # each projection's adapter sees its own dropout of its input, as each expert's layers do
        low = torch.cat([grouped(_dropped(x, plan.dropout), a_gate), grouped(_dropped(x, plan.dropout), a_up)], 1)
    else:
        low = grouped(x, a_gate_up)
    low = low * scaling  # (rows, 2r)
    update_gate = grouped(low[:, :rank].contiguous(), b_gate)  # (rows, I)
    update_up = grouped(low[:, rank:].contiguous(), b_up)
    compiled = COMPILED_ELEMENTWISE and experts.__dict__.get(COMPILE_ELEMENTWISE)
    swiglu = _compiled_weighted_swiglu() if compiled else weighted_swiglu
    h = swiglu(base, update_gate, update_up, row_weights)  # (rows, I)
    down = _FrozenGroupedProduct.apply(h, offsets, plan.down_weights)
    update = grouped(grouped(_dropped(h, plan.dropout), a_down) * scaling, b_down)  # (rows, C)
    # Compiled, the caller adds the two as it sums each token's rows (one pass instead of three).
    return (down, update) if compiled else down + update


def _dropped(x: torch.Tensor, probability: float) -> torch.Tensor:
    """x under an adapter's dropout (inverted: the kept values scaled by 1 / (1 - p)); x itself for p = 0."""
    return F.dropout(x, probability) if probability else x


def _rows_one_by_one(
    plan: _Plan, experts: nn.ModuleList, x: torch.Tensor, ends: torch.Tensor, row_weights: torch.Tensor
) -> torch.Tensor:
    """`experts_together` for 4-bit experts given few rows without gradients (decoding): each row's expert found
    on the device, its weights (only those) dequantized for that row, and every product a batched one over the
    rows, so that nothing is read on the host (the decoding step can be recorded in a CUDA graph) and the experts
    no row chose cost nothing."""
    rows = torch.arange(x.shape[0], device=x.device, dtype=ends.dtype)
    expert_of_row = torch.searchsorted(ends, rows, right=True)  # (rows,): row i lies in expert e's run
    gate_up_rows, down_rows = (rows_of(expert_of_row) for rows_of in plan.few_rows)  # (rows, 2I, C), (rows, C, I)

    def each(inputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # inputs[i] @ weights[i]^T
        return torch.bmm(inputs[:, None, :], weights.transpose(1, 2))[:, 0]

    base = each(x, gate_up_rows)  # (rows, 2I)
    if not plan.adapted:
        return each(weighted_swiglu(base, None, None, row_weights), down_rows)
    rank, scaling = plan.rank, plan.scaling
    a_gate, a_up, a_down, b_gate, b_up, b_down = (
        factor.index_select(0, expert_of_row) for factor in plan.adapter_factors(experts, x.dtype)
    )
    low = torch.cat([each(_dropped(x, plan.dropout), a_gate), each(_dropped(x, plan.dropout), a_up)], 1) * scaling
    h = weighted_swiglu(base, each(low[:, :rank], b_gate), each(low[:, rank:], b_up), row_weights)  # (rows, I)
    return each(h, down_rows) + each(each(_dropped(h, plan.dropout), a_down) * scaling, b_down)


def weighted_swiglu(
    base: torch.Tensor, update_gate: torch.Tensor | None, update_up: torch.Tensor | None, row_weights: torch.Tensor
) -> torch.Tensor:
    """h = silu(gate) * up * router weight, gate and up being the base GEMM's halves plus the adapters' updates
    (None: plain experts, without adapters). Down is linear: weighting its input weights its output, on a tensor a
    third as wide."""
    width = base.shape[1] // 2
    gate, up = base[:, :width], base[:, width:]
    if update_gate is not None:
        gate, up = gate + update_gate, up + update_up
    return F.silu(gate) * up * row_weights[:, None]


@functools.cache
def _compiled_weighted_swiglu() -> Callable[..., torch.Tensor]:
    return torch.compile(weighted_swiglu, dynamic=True)


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
