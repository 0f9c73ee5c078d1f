"""Lightning Fabric set-up: accelerator, devices, nodes, strategy and precision.

Precision is split in two. The model's weights are loaded straight into their training dtype by litft's loader
("bf16-true" loads bf16 tensors), so Fabric is never asked to cast a module: casting would also cast the float32
quantization state (block scales) of 4-bit layers. Fabric keeps the mixed-precision modes (autocast, gradient
scaling), which do not touch stored weights.

Strategies: "single" (one device), "ddp" (a full replica per device, gradients all-reduced) and "fsdp" (FSDP2
through Fabric's `ModelParallelStrategy`: every decoder block and then the root are `fully_shard`ed, see
`litft.training.parallel`). "auto" is "single" on one device; on several it is DDP when the model, its gradients
and its optimizer state fit on one device, FSDP2 otherwise.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from dataclasses import dataclass

import torch
from lightning.fabric import Fabric
from torch import nn

from litft.adapters.lora_projections import keeping_outputs
from litft.errors import ConfigError

PRECISIONS = ("bf16-true", "16-true", "32-true", "bf16-mixed", "16-mixed")
STRATEGIES = ("auto", "single", "ddp", "fsdp")
# DDP is chosen only if the weights, gradients and optimizer state take at most this share of a device's memory;
# the rest is left for activations, the logits chunks and the allocator's fragmentation.
DDP_MEMORY_SHARE = 0.7
# AdamW keeps two float32 moments per trained parameter.
OPTIMIZER_BYTES_PER_TRAINED_PARAMETER = 8


def resolve_precision(precision: str | None, accelerator: str) -> tuple[str, torch.dtype, str]:
    """Returns (precision name, dtype to load weights in, precision string for Fabric)."""
    if precision is None:
        on_gpu = accelerator in ("cuda", "gpu", "auto") and torch.cuda.is_available()
        precision = "bf16-true" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"
    aliases = {"bf16": "bf16-true", "fp16": "16-true", "16": "16-true", "32": "32-true", "fp32": "32-true"}
    precision = aliases.get(precision, precision)
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    weights_dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(precision, torch.float32)
    fabric_precision = precision if precision.endswith("-mixed") else "32-true"
    return precision, weights_dtype, fabric_precision


@dataclass(frozen=True)
class ModelMemory:
    """What a model needs on one device when it is not sharded, from its parameter counts and dtypes."""

    weight_bytes: int  # every parameter and buffer as stored (4-bit bases at their packed size)
    trained_parameters: int
    trained_bytes: int  # the trained parameters as stored; their gradients take as much again

    @property
    def unsharded_bytes(self) -> int:
        return self.weight_bytes + self.trained_bytes + OPTIMIZER_BYTES_PER_TRAINED_PARAMETER * self.trained_parameters


def device_memory_bytes(accelerator: str) -> int | None:
    """The memory of one device, or None on CPU (host memory is not what limits a CPU run)."""
    if accelerator in ("cuda", "gpu", "auto") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return None


def count_devices(accelerator: str, devices: int | str) -> int:
    """`--devices` as a number: "auto" and -1 mean every visible GPU (or 1 on CPU)."""
    if devices in ("auto", -1, "-1"):
        return torch.cuda.device_count() if accelerator != "cpu" and torch.cuda.is_available() else 1
    try:
        count = int(devices)
    except ValueError:
        raise ConfigError(f"--devices {devices!r}: pass a number of devices per node, or auto") from None
    if count < 1:
        raise ConfigError(f"--devices {devices}: must be at least 1 (or auto)")
    return count


def choose_strategy(
    strategy: str, world_size: int, memory: ModelMemory | None, device_bytes: int | None
) -> tuple[str, str]:
    """The strategy to run ("single", "ddp" or "fsdp") for `--strategy` and the reason, for the log."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if strategy == "single" and world_size > 1:
        raise ConfigError(f"--strategy single runs on one device, but {world_size} were asked for; use auto, ddp or fsdp")
    if strategy != "auto":
        return strategy, "as asked by --strategy"
    if world_size == 1:
        return "single", "one device"
    if memory is None or device_bytes is None:
        return "ddp", "the device memory is not limiting (CPU)"
    needed, budget = memory.unsharded_bytes / 1024**3, DDP_MEMORY_SHARE * device_bytes / 1024**3
    if memory.unsharded_bytes <= DDP_MEMORY_SHARE * device_bytes:
        return "ddp", f"weights, gradients and optimizer state take {needed:.1f} GiB, within {budget:.1f} GiB per device"
    return "fsdp", f"weights, gradients and optimizer state take {needed:.1f} GiB, more than {budget:.1f} GiB per device"


def check_slurm_allocation(devices: int, num_nodes: int) -> None:
    """Under SLURM every task is one rank: the allocation must match --devices x --num_nodes, or the ranks that
    were asked for but never started leave the others waiting forever at the first collective."""
    if "SLURM_NTASKS" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return
    tasks = int(os.environ["SLURM_NTASKS"])
    nodes = int(os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES") or num_nodes)
    # SLURM writes e.g. "4" or "4(x2)" (four tasks on each of two nodes).
    per_node_text = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE") or ""
    match = re.match(r"\d+", per_node_text)
    tasks_per_node = int(match.group()) if match else tasks // max(nodes, 1)
    if tasks_per_node != devices or nodes != num_nodes or tasks != devices * num_nodes:
        raise ConfigError(
            f"--devices {devices} --num_nodes {num_nodes} do not match the SLURM allocation ({nodes} node(s), "
            f"{tasks_per_node} task(s) per node, {tasks} in all): pass --devices {tasks_per_node} --num_nodes {nodes}, "
            "or set #SBATCH --ntasks-per-node to the GPUs per node (see `litft slurm`)"
        )


def make_fabric(
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str = "32-true",
    loggers: list | None = None,
    memory: ModelMemory | None = None,
    fsdp_cpu_offload: bool = False,
) -> Fabric:
    """A Fabric for `strategy` (see the module docstring; "auto" weighs `memory` against the device's).
    `fsdp_cpu_offload` keeps FSDP2's parameter shards, gradients and optimizer state in host memory."""
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--accelerator cuda: no CUDA GPU is visible on this machine; use --accelerator cpu")
    if num_nodes < 1:
        raise ConfigError(f"--num_nodes {num_nodes}: must be at least 1")
    device_count = count_devices(accelerator, devices)
    check_slurm_allocation(device_count, num_nodes)
    chosen, reason = choose_strategy(strategy, device_count * num_nodes, memory, device_memory_bytes(accelerator))
    if fsdp_cpu_offload and chosen != "fsdp":
        raise ConfigError(f"--fsdp_cpu_offload needs --strategy fsdp (the run uses {chosen})")
    if strategy == "auto" and _is_first_process():
        log(f"strategy: {chosen} ({reason})")
    if chosen == "fsdp":
        on_gpus = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
        fabric_strategy = _fsdp2_strategy(device_count * num_nodes, precision, fsdp_cpu_offload, on_gpus)
    elif chosen == "ddp":
        fabric_strategy = "ddp"
    else:
        fabric_strategy = "auto"
    return Fabric(
        accelerator=accelerator,
        devices=device_count,
        num_nodes=num_nodes,
        strategy=fabric_strategy,
        precision=precision,
        loggers=loggers,
    )


def _is_first_process() -> bool:
    """Before Fabric starts the ranks: is this the process that becomes global rank 0 (the launching process, or
    SLURM's task 0)?"""
    rank_variables = ("SLURM_PROCID", "LOCAL_RANK", "NODE_RANK") if "SLURM_NTASKS" in os.environ else ("LOCAL_RANK", "NODE_RANK")
    return all(int(os.environ.get(name, "0")) == 0 for name in rank_variables)


def _fsdp2_strategy(world_size: int, precision: str, cpu_offload: bool, on_gpus: bool):
    from lightning.fabric.strategies import ModelParallelStrategy

    from litft.training.parallel import parallelize_fsdp2

    parallelize = functools.partial(
        parallelize_fsdp2, mixed_precision=precision == "bf16-mixed", cpu_offload=cpu_offload
    )
    # Offloaded shards and their gradients live in host memory, and reductions over them (the gradient norm) need a
    # process group for CPU tensors next to NCCL's.
    backend = "cuda:nccl,cpu:gloo" if cpu_offload and on_gpus else None
    # One data-parallel dimension over every rank; litft does not do tensor parallelism.
    return ModelParallelStrategy(
        parallelize_fn=parallelize, data_parallel_size=world_size, tensor_parallel_size=1,
        process_group_backend=backend,
    )


def is_fsdp(fabric: Fabric) -> bool:
    from lightning.fabric.strategies import ModelParallelStrategy

    return isinstance(fabric.strategy, ModelParallelStrategy)


def enable_activation_checkpointing(model: nn.Module, offload: bool = False, blocks: int | None = None) -> None:
    """Recomputes each decoder block (only the first `blocks` of them when given) in the backward pass. The block's
    `forward` is wrapped on the instance, so module and parameter names stay unchanged (checkpoints and adapters
    keep their keys). Under FSDP2 the block is sharded afterwards: its hooks run around the wrapped forward, and the recomputation in the backward happens
    after the pre-backward hook has gathered the block's weights again.

    `offload=True` also moves what each block keeps, its input, to pinned host memory, copied on a side stream while
    the next blocks compute, and brought back one block ahead of the backward (`OffloadedBlocks`): the GPU then holds
    no activations of the blocks between forward and backward, at the price of PCIe copies that overlap compute.

    `blocks`: checkpoint the first `blocks` decoder blocks and let the later ones keep their activations. Every
    kept activation is alive at the start of the backward whichever block it belongs to, so memory depends only on
    how many blocks are left out; the last ones are left out because their backward comes first (an offloaded copy
    of their input would be fetched back at once)."""
    from torch.utils.checkpoint import checkpoint

    count = checkpointed_block_count(len(model.blocks), blocks)
    chosen = list(model.blocks)[:count]
    if offload:
        OffloadedBlocks(chosen)
        return
    for block in chosen:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def checkpointed_block_count(layers: int, blocks: int | None) -> int:
    """How many of `layers` decoder blocks `--train.checkpointed_blocks blocks` checkpoints."""
    if blocks is None:
        return layers
    if blocks < 0:
        raise ConfigError(f"--train.checkpointed_blocks {blocks}: must be 0 or more (None: every block)")
    return min(blocks, layers)


# Which projection groups an offloaded block keeps the outputs of from its forward (instead of computing them again
# in the backward), by how much wider a token's output is than its input. 1.5 keeps o, down and grouped-query q/k/v:
# on llama-8b 28 KB per token and layer, 46% of the block's base GEMMs not recomputed (+12% tokens/s on an H200,
# benchmarks/NOTES.md, section 13); gate/up (7x) would add 56 KB, more than PCIe carries while a forward runs
# (~55 GB/s each way against ~34 KB per token and layer of forward time, block input included). 0 keeps none.
KEPT_OUTPUT_WIDENING = 1.5
# The kept outputs of one process hold at most this share of the machine's memory (divided among its GPUs) at a
# time; past it the outputs are recomputed, as without keeping. Block inputs are not counted: they must be kept.
KEPT_OUTPUT_HOST_SHARE = 0.25
# One block's kept outputs come back to the GPU while the block after it recomputes, so they add to the peak: at
# most this share of the GPU's memory (llama-8b keeps 0.44 GiB per block at 16k tokens, 1% of an H200 is 1.4 GiB),
# so that very long sequences, where memory and not speed is the point, lose at most 1% of their length.
KEPT_OUTPUT_DEVICE_SHARE = 0.01


class OffloadedBlocks:
    """Activation checkpointing with the checkpoints (the block inputs) kept in host memory.

    Each block's forward runs without autograd recording; its input is copied to pinned host memory on a side
    stream. The backward of a block brings its input back (the copy started when the block after it began its
    backward), runs the block again with autograd on, and backpropagates through that recomputation. The block's
    own forward is `inner_forward`: a compiler replaces that (not the wrapper, whose stream work it cannot trace),
    see `litft.training.compilation`.

    The outputs of the projections that widen a token little (o, down, grouped-query q/k/v: `KEPT_OUTPUT_WIDENING`)
    go to host memory beside the input and come back with it: the recomputation takes them instead of running
    those GEMMs again (`litft.adapters.lora_projections.keeping_outputs`; LoRA layers computed by litft's operators,
    so not a float8 base or DoRA)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        self.pending: list[_BlockCheckpoint] = []  # forward order; the backward walks it from the end
        self.side_stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.kept_bytes = 0
        self.kept_budget = host_memory_bytes() * KEPT_OUTPUT_HOST_SHARE / max(1, torch.cuda.device_count())
        self.block_budget = kept_bytes_per_block()
        for block in blocks:
            block.activation_offload = _OffloadedBlock(self, block.forward)
            block.forward = block.activation_offload

    def clear(self) -> None:
        """Drops what forwards without a backward left behind (the memory probe's passes)."""
        self.pending.clear()
        self.kept_bytes = 0


def kept_bytes_per_block() -> float:
    """How many bytes of kept outputs one block may hold (`KEPT_OUTPUT_DEVICE_SHARE`; on CPU only the host budget)."""
    if not torch.cuda.is_available():
        return float("inf")
    return KEPT_OUTPUT_DEVICE_SHARE * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: keep nothing beyond the inputs
        return 0


class _OffloadedBlock:
    def __init__(self, owner: OffloadedBlocks, inner_forward) -> None:
        self.owner = owner
        self.inner_forward = inner_forward

    def __call__(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation, or a reference model: nothing to keep for a backward
            return self.inner_forward(hidden, *args, **kwargs)
        # The parameters the block trains are not inputs of the autograd function; the anchor, an input that
        # requires grad, makes autograd record it even when `hidden` needs no gradient (the first block's input).
        return _OffloadedCheckpoint.apply(self, args, kwargs, hidden, _GRAD_ANCHOR)


class _HostCheckpoint:
    """A tensor on its way to host memory and back."""

    def __init__(self, tensor: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
        self.device = tensor.device
        self.stream = stream
        self.on_device: torch.Tensor | None = None
        if stream is None or tensor.device.type != "cuda":
            self.host = tensor.detach().clone()  # CPU runs: a copy, so the caller may reuse its tensor
            self.copied = None
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream())  # the tensor is complete before it is copied
        with torch.cuda.stream(stream):
            self.host.copy_(tensor, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(stream)
        tensor.record_stream(stream)  # its memory is not reused before the copy has read it

    def prefetch(self) -> None:
        if self.on_device is not None:
            return
        if self.copied is None:
            self.on_device = self.host.to(self.device)
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.copied)
            self.on_device = self.host.to(self.device, non_blocking=True)
            self.arrived = torch.cuda.Event()
            self.arrived.record(self.stream)

    def take(self) -> torch.Tensor:
        self.prefetch()
        tensor = self.on_device
        if self.copied is not None:
            torch.cuda.current_stream().wait_event(self.arrived)
            tensor.record_stream(torch.cuda.current_stream())
        self.on_device = None
        return tensor


class _KeptOutputs:
    """One block's kept projection outputs (`litft.adapters.lora_projections.OutputKeeper`), one entry per call the
    keeper was asked about, in call order: the forward fills the entries, the recomputation takes them in the same
    order. An entry is None where a budget was spent (the host's, or the block's share of the GPU): that call
    computes its outputs again."""

    def __init__(self, owner: OffloadedBlocks) -> None:
        self.owner = owner
        self.calls: list[list[_HostCheckpoint] | None] = []
        self.bytes = 0
        self.replaying = False
        self.taken = 0

    def keeps(self, out_width: int, in_width: int) -> bool:
        return out_width <= KEPT_OUTPUT_WIDENING * in_width

    def keep(self, outputs: list[torch.Tensor]) -> None:
        if self.replaying:  # a call whose outputs were not kept computed them again: nothing to keep now
            return
        size = _byte_count(outputs)
        if self.bytes + size > self.owner.block_budget or self.owner.kept_bytes + size > self.owner.kept_budget:
            self.calls.append(None)
            return
        self.bytes += size
        self.owner.kept_bytes += size
        self.calls.append([_HostCheckpoint(output, self.owner.side_stream) for output in outputs])

    def take(self, shapes: list[tuple[int, ...]]) -> list[torch.Tensor] | None:
        if not self.replaying:
            return None
        if self.taken >= len(self.calls):
            raise RuntimeError("litft: a block's recomputation asked for more kept outputs than its forward kept")
        call, self.calls[self.taken] = self.calls[self.taken], None
        self.taken += 1
        if call is None:
            return None
        outputs = [checkpoint.take() for checkpoint in call]
        if [tuple(output.shape) for output in outputs] != [tuple(shape) for shape in shapes]:
            raise RuntimeError("litft: a block's recomputation called its projections in a new order")
        self.owner.kept_bytes -= _byte_count(outputs)
        return outputs

    def prefetch(self) -> None:
        for call in self.calls:
            for checkpoint in call or ():
                checkpoint.prefetch()


def _byte_count(tensors: list[torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class _BlockCheckpoint:
    """What an offloaded block keeps between its forward and its backward: its input, and the kept outputs."""

    def __init__(self, hidden: torch.Tensor, owner: OffloadedBlocks) -> None:
        self.input = _HostCheckpoint(hidden, owner.side_stream)
        self.outputs = _KeptOutputs(owner)

    def prefetch(self) -> None:
        self.input.prefetch()
        self.outputs.prefetch()


_GRAD_ANCHOR = torch.empty(0, requires_grad=True)


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block: _OffloadedBlock, args: tuple, kwargs: dict, hidden: torch.Tensor, anchor: torch.Tensor):  # type: ignore[override]
        ctx.block, ctx.args, ctx.kwargs = block, args, kwargs
        # Recomputation must draw the same dropout masks as this pass did.
        ctx.cpu_rng_state = torch.get_rng_state()
        ctx.cuda_rng_state = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.checkpoint = _BlockCheckpoint(hidden, block.owner)
        block.owner.pending.append(ctx.checkpoint)
        with torch.no_grad(), keeping_outputs(ctx.checkpoint.outputs):
            return block.inner_forward(hidden, *args, **kwargs)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        owner = ctx.block.owner
        index = owner.pending.index(ctx.checkpoint)
        if index > 0:
            owner.pending[index - 1].prefetch()  # the block before this one is next in the backward
        needs_input_grad = ctx.needs_input_grad[3]
        hidden = ctx.checkpoint.input.take().detach().requires_grad_(needs_input_grad)
        kept = ctx.checkpoint.outputs
        kept.replaying = True
        owner.pending.pop(index)
        devices = [hidden.device] if hidden.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng_state)
            if ctx.cuda_rng_state is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng_state, hidden.device)
            with torch.enable_grad(), keeping_outputs(kept):
                output = ctx.block.inner_forward(hidden, *ctx.args, **ctx.kwargs)
        if kept.taken != len(kept.calls):
            raise RuntimeError("litft: a block's recomputation took fewer kept outputs than its forward kept")
        if not owner.pending:
            owner.kept_bytes = 0  # the step's last block: whatever is left counted belongs to no one
        torch.autograd.backward(output, grad_output)
        return None, None, None, hidden.grad if needs_input_grad else None, None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
