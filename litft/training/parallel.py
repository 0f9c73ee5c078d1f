"""FSDP2: sharding a model over the data-parallel ranks, and getting the base weights into the shards.

Sharding (`parallelize_fsdp2`, Fabric's `ModelParallelStrategy` calls it in `setup_module`): `fully_shard` each
decoder block, then the root, so one block's weights are gathered at a time. Activation checkpointing is already
on the blocks by then (it wraps `block.forward`; FSDP's hooks run around it). With `bf16-mixed` the float32 weights
are gathered and computed in bf16 and gradients are reduced in float32 (`MixedPrecisionPolicy`); with the "-true"
precisions the weights already are in their training dtype and are gathered as they are.

QLoRA bases shard like any other weight: a 4-bit weight is a plain frozen Parameter holding the packed data
viewed as the compute dtype (bitsandbytes' `quant_storage`), and its quantization state (block scales) is a set of
buffers of the same layer, which FSDP2 leaves whole on every rank. Nothing depends on a Parameter subclass, which
FSDP2 would turn into a plain Parameter.

Loading (`share_model`, `load_full_state`): only rank 0 loads the checkpoint, the way a single-device run does
(so adapters start from the very same values); the other ranks receive the model's structure with meta tensors,
shard it and allocate only their shards; then every tensor is broadcast from rank 0 and each rank keeps its
shard (`set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)`). No other rank ever holds a
full copy of the model.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from lightning.fabric import Fabric
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def decoder_blocks(module: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a model or of the `CausalLMObjective` wrapping it."""
    return module.blocks if hasattr(module, "blocks") else module.model.blocks


def fsdp2_shards_integer_parameters() -> bool:
    """FSDP2 before torch 2.13 re-creates each sharded parameter as trainable, which an integer tensor cannot be
    (the float8 base keeps its bytes as frozen uint8 Parameters): measured failing under 2.11, working under 2.13."""
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return version >= (2, 13)


def refuse_integer_parameters_before_torch_2_13(module: nn.Module) -> None:
    """A one-line error where FSDP2 could not shard `module` (see `fsdp2_shards_integer_parameters`)."""
    from litft.errors import ConfigError

    if not fsdp2_shards_integer_parameters() and any(not p.is_floating_point() for p in module.parameters()):
        raise ConfigError(
            f"--quantize fp8 with --strategy fsdp needs torch 2.13 or newer (this is {torch.__version__}, whose FSDP2 "
            "cannot shard the float8 base's byte tensors); use --strategy ddp"
        )


def parallelize_fsdp2(
    module: nn.Module, device_mesh: DeviceMesh, mixed_precision: bool = False, cpu_offload: bool = False
) -> nn.Module:
    """Shards `module` with FSDP2 over the data-parallel ranks of `device_mesh` (see the module docstring);
    a module built on the meta device gets its shards allocated, uninitialised (`load_full_state` fills them)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    refuse_integer_parameters_before_torch_2_13(module)
    mesh = device_mesh["data_parallel"]
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    for block in decoder_blocks(module):
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload)
    # The root holds the embeddings and the output head; the head runs last in the forward and first in the
    # backward, so its weights stay gathered in between.
    fully_shard(module, mesh=mesh, mp_policy=policy, offload_policy=offload, reshard_after_forward=False)
    if any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
        device = torch.device("cpu") if cpu_offload else _mesh_device(mesh)
        module.to_empty(device=device)
    return module


def _mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` with every parameter and buffer on the meta device: same classes, names, shapes, dtypes,
    `requires_grad` flags and ties, no memory."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def share_model(fabric: Fabric, load: Callable[[], nn.Module]) -> nn.Module:
    """Rank 0 runs `load()`; every other rank gets a meta copy of the result to shard."""
    model = load() if fabric.global_rank == 0 else None
    skeleton = fabric.broadcast(meta_copy(model) if model is not None else None, src=0)
    return model if model is not None else skeleton


def load_full_state(module: nn.Module, full_state: dict[str, torch.Tensor] | None) -> None:
    """Fills the shards of a `fully_shard`ed `module` from rank 0's full state dict (the other ranks pass None)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(module, full_state or {}, options=options)


@contextmanager
def consolidated(model: nn.Module, trained_only: bool) -> Iterator[dict[str, torch.Tensor] | None]:
    """The whole model's (or only its trained tensors') values, for rank 0 to write the final adapter or
    checkpoint. Every rank must enter: under FSDP2 the shards are gathered collectively.

    Without sharding, yields None and changes nothing. With `trained_only`, each trained parameter's shard is
    swapped for its full tensor (adapters are small) until the block exits, so code that reads the adapter from
    the model works unchanged; yields None. Otherwise yields the full state dict, gathered tensor by tensor into
    rank 0's host memory (the other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        yield None
        return
    if not trained_only:
        yield get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and parameter.requires_grad and isinstance(parameter, DTensor):
                module._parameters[name] = nn.Parameter(parameter.full_tensor().detach(), requires_grad=False)
                swapped.append((module, name, parameter))
    try:
        yield None
    finally:
        for module, name, parameter in swapped:
            module._parameters[name] = parameter
