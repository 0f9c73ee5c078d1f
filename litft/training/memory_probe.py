"""`--train.micro_batch_size auto` on a GPU: a short probe, then a margin.

The estimate (`litft.training.estimate`) picks a micro-batch from the model's shape before anything is loaded. Once
the model and optimizer are set up on a CUDA device, `probe_micro_batch` checks that pick by measuring: it runs real
forward and backward passes of the training objective on synthetic micro-batches (random token ids, every position
trained, rows of `--data.max_seq_length` tokens: packed rows and padded batches never get longer), reads
`torch.cuda.max_memory_allocated`, adds the optimizer state that is not allocated yet (AdamW creates its moments
at the first step), and keeps the largest micro-batch whose total stays within 90% of the device. A micro-batch
that runs out of memory does not fit.

Each candidate runs as `train_step` runs it: when the per-device rows need gradient accumulation, a first
micro-batch without gradient synchronisation and a second one with it (FSDP2's reduce-scatter), so the peak
includes the gradients a previous micro-batch left behind. Under DDP both run without synchronisation: DDP's
gradient buckets are allocated when the model is wrapped (already counted), and a backward that ran out of memory
half-way would leave DDP's reducer expecting the rest of its all-reduce.

Every rank probes the same candidates and they decide together: a candidate fits only if it fits on every rank.
The probe leaves nothing behind that training would notice: gradients are dropped, the CPU and CUDA random states
(dropout) are restored, the peak-memory statistics reset and the cached blocks released.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from litft.training.estimate import GIB, MEMORY_FRACTION, micro_batch_candidates

# ----------------------------------------------------------------------------------------------------------------
# The search (pure: unit-tested with a synthetic memory model)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """What the probe measured and chose. `measured`: each probed micro-batch, in the order probed, with its
    measured peak in bytes (without the optimizer state), or None where it ran out of memory."""

    chosen: int
    fits: bool  # False: not even the smallest candidate fits; `chosen` is then that smallest one
    measured: dict[int, int | None]
    optimizer_state_bytes: int
    budget_bytes: float  # `fraction` of the device's memory
    fraction: float = MEMORY_FRACTION
    seconds: float = 0.0

    def describe(self, estimated: int) -> str:
        """One log line: what the estimate said, what the probe measured, what was chosen."""
        measured = ", ".join(
            f"{size}: out of memory" if peak is None else f"{size}: {(peak + self.optimizer_state_bytes) / GIB:.2f} GiB"
            for size, peak in self.measured.items()
        )
        state = (
            f" (including {self.optimizer_state_bytes / GIB:.2f} GiB of optimizer state not yet allocated)"
            if self.optimizer_state_bytes else ""
        )
        budget = f"the {self.budget_bytes / GIB:.1f} GiB allowed per device ({self.fraction:.0%} of its memory)"
        verdict = (
            f"chosen {self.chosen}, the largest within {budget}" if self.fits
            else f"chosen {self.chosen}, the smallest, though it exceeds {budget}, so training may run out of memory"
        )
        return (
            f"--train.micro_batch_size auto: the estimate said {estimated}; the probe measured peak memory per device "
            f"{measured}{state}; {verdict}; the probe took {self.seconds:.0f} s"
        )


def search_micro_batch(
    measure: Callable[[int], int | None],
    per_device_rows: int,
    start: int,
    device_bytes: float,
    extra_bytes: int = 0,
    fraction: float = MEMORY_FRACTION,
) -> ProbeResult:
    """The largest divisor of `per_device_rows` whose measured peak plus `extra_bytes` (optimizer state still to
    come) stays within `fraction` of `device_bytes`.

    `measure(size)` runs a micro-batch of `size` rows and returns its peak in bytes, or None when it ran out of
    memory (which never fits). The search starts at `start` (the estimate's pick, lowered to a divisor): from
    there it goes up while the next candidate fits, or down until one does. Each candidate is measured at most
    once; none above the first that does not fit is tried. If none fits, the smallest is returned with
    `fits=False`."""
    candidates = micro_batch_candidates(per_device_rows)
    budget = fraction * device_bytes
    measured: dict[int, int | None] = {}

    def fits(index: int) -> bool:
        size = candidates[index]
        peak = measure(size)
        measured[size] = peak
        return peak is not None and peak + extra_bytes <= budget

    index = max((i for i, size in enumerate(candidates) if size <= start), default=0)
    if fits(index):
        while index + 1 < len(candidates) and fits(index + 1):
            index += 1
        return ProbeResult(candidates[index], True, measured, extra_bytes, budget, fraction)
    while index > 0:
        index -= 1
        if fits(index):
            return ProbeResult(candidates[index], True, measured, extra_bytes, budget, fraction)
    return ProbeResult(candidates[0], False, measured, extra_bytes, budget, fraction)


# ----------------------------------------------------------------------------------------------------------------
# What is not allocated yet: the optimizer state
# ----------------------------------------------------------------------------------------------------------------


def local_tensor(parameter: torch.Tensor) -> torch.Tensor:
    """The part of `parameter` this rank holds: its local shard under FSDP2 (a DTensor), else itself."""
    to_local = getattr(parameter, "to_local", None)
    if to_local is None:
        return parameter
    with torch.no_grad():
        return to_local()


def optimizer_state_bytes(optimizer: Any, device: torch.device) -> int:
    """The bytes on `device` that `optimizer`'s state will take for the parameters that have none yet (torch's
    AdamW creates its two moments, in each parameter's dtype, at the first step; a resumed run already has them).
    Counted per rank on its local shards; parameters kept elsewhere (FSDP2's CPU offload) count nothing."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Fabric's wrapper holds the optimizer
    is_bitsandbytes = type(inner).__module__.startswith("bitsandbytes")
    min_8bit_size = getattr(getattr(inner, "args", None), "min_8bit_size", 4096)
    total = 0.0
    for group in inner.param_groups:
        for parameter in group["params"]:
            if not parameter.requires_grad or inner.state.get(parameter):
                continue
            local = local_tensor(parameter)
            if local.device.type != device.type:
                continue
            if isinstance(inner, torch.optim.SGD):
                per_element = local.element_size() if group.get("momentum") else 0
            elif is_bitsandbytes:
                # Two moments: 8-bit with a float32 scale per block of 256 for large tensors, float32 otherwise.
                eight_bit = "8bit" in type(inner).__name__ and local.numel() >= min_8bit_size
                per_element = 2 * (1 + 4 / 256) if eight_bit else 2 * 4
            else:  # torch's Adam / AdamW: exp_avg and exp_avg_sq in the parameter's dtype (and max_exp_avg_sq)
                per_element = local.element_size() * (3 if group.get("amsgrad") else 2)
            total += per_element * local.numel()
    return int(total)


# ----------------------------------------------------------------------------------------------------------------
# The passes
# ----------------------------------------------------------------------------------------------------------------


def synthetic_rows(
    micro_batch_size: int, seq_len: int, vocab_size: int, packed: bool, generator: torch.Generator
) -> list[list[dict[str, torch.Tensor]]]:
    """`micro_batch_size` rows of `seq_len` tokens, the longest a row gets, every position trained. Packed rows
    hold two samples, so they take the same attention path as packed training rows (document ids)."""
    def sample(length: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.randint(vocab_size, (length,), generator=generator),
            "targets": torch.randint(vocab_size, (length,), generator=generator),
        }

    if packed and seq_len >= 2:
        return [[sample(seq_len // 2), sample(seq_len - seq_len // 2)] for _ in range(micro_batch_size)]
    return [[sample(seq_len)] for _ in range(micro_batch_size)]


def drop_probe_leftovers(model: nn.Module, aborted: bool = False) -> None:
    """Frees what probe passes leave on the model: gradients, block inputs and kept outputs waiting in offloaded
    activation checkpointing, and FSDP2's unsharded gradients and gathered weights. `aborted`: a pass stopped
    half-way (out of memory), which also leaves FSDP2's per-iteration state behind."""
    for parameter in model.parameters():
        parameter.grad = None
    for module in model.modules():
        offload = getattr(module, "activation_offload", None)
        if offload is not None:
            offload.owner.clear()
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return
    fsdp_modules = [module for module in model.modules() if isinstance(module, FSDPModule)]
    if aborted:
        for module in fsdp_modules:
            if getattr(module._get_fsdp_state(), "_is_root", None):
                _reset_fsdp_iteration(module)
    for module in fsdp_modules:
        for group in _fsdp_param_groups(module._get_fsdp_state()):
            for fsdp_param in group.fsdp_params:
                # Without gradient sync (all but the last micro-batch) FSDP2 keeps full-size gradients here, and
                # the next backward would add to them.
                fsdp_param.unsharded_accumulated_grad = None
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    unsharded.grad = None
        module.reshard()


def _fsdp_param_groups(state: Any) -> list[Any]:
    groups = getattr(state, "_fsdp_param_groups", None)  # newer torch: possibly several per module
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [group] if group is not None else []


def _reset_fsdp_iteration(root: nn.Module) -> None:
    """FSDP2 after a forward or backward that raised: its root still believes an iteration is under way (the
    backward's final callback, which would end it, never ran, and is never queued again), so the next backward
    would never reduce-scatter its gradients. torch 2.13 has `reset_iter_state` for exactly this."""
    reset = getattr(root, "reset_iter_state", None)
    if reset is not None:
        reset()
        return
    # Earlier torch: the same by hand, on the fields those releases share.
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    state = root._get_fsdp_state()
    context = state._state_ctx
    context.iter_forward_root = None
    context.post_backward_final_callback_queued = False
    for each in context.all_states:
        each._training_state = TrainingState.IDLE
        for group in _fsdp_param_groups(each):
            group._training_state = TrainingState.IDLE
            group.reshard()


def run_probe_passes(
    fabric: Any,
    model: nn.Module,
    objective: Any,
    micro_batch_size: int,
    per_device_rows: int,
    seq_len: int,
    vocab_size: int,
    packed: bool = False,
) -> bool:
    """Forward and backward passes of `objective` on synthetic micro-batches of `micro_batch_size` rows, as
    `train_step` runs them (two when the rows need accumulation, else one); `model` is the Fabric-wrapped module.
    Returns whether they completed on every rank (False: some rank ran out of memory). Gradients are dropped
    afterwards; the random states are not restored here (see `leaves_no_trace`)."""
    from litft.training.loop import to_device
    from litft.training.strategies import is_fsdp

    accumulation = per_device_rows // micro_batch_size
    passes = min(2, accumulation)
    # FSDP2 reduce-scatters on the last micro-batch, as training does; see the module docstring for DDP.
    sync_last = is_fsdp(fabric)
    generator = torch.Generator().manual_seed(micro_batch_size)  # not the global RNG: training draws from that
    completed = True
    for index in range(passes):
        sync = sync_last and index == passes - 1
        rows = synthetic_rows(micro_batch_size, seq_len, vocab_size, packed, generator)
        try:
            _forward_backward(fabric, model, objective, rows, sync, to_device)
        except torch.OutOfMemoryError:
            completed = False
        # Out of memory anywhere stops every rank here, before the next pass's collectives.
        if fabric.world_size > 1:
            failed = torch.tensor(0.0 if completed else 1.0, device=fabric.device)
            completed = fabric.all_reduce(failed, reduce_op="max").item() == 0.0
        if not completed:
            break
    drop_probe_leftovers(model, aborted=not completed)
    return completed


def _forward_backward(fabric: Any, model: nn.Module, objective: Any, rows: list, sync: bool, to_device: Callable) -> None:
    # A function of its own: when it raises, its tensors go with its frame once the exception is handled.
    batch = to_device(objective.collate(rows), fabric.device)
    units = max(float(objective.count(batch)), 1.0)
    with fabric.no_backward_sync(model, enabled=not sync):
        loss, _ = objective.loss_sum(model, batch)
        fabric.backward(loss / units)


@contextmanager
def leaves_no_trace(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Restores the CPU and `device`'s random states (dropout draws) and drops gradients on the way out; on CUDA
    also releases the cached blocks and resets the peak-memory statistics, so training's first step starts as if
    nothing had run."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        drop_probe_leftovers(model)
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------------------------
# The probe
# ----------------------------------------------------------------------------------------------------------------


def probe_micro_batch(
    fabric: Any,
    model: nn.Module,
    objective: Any,
    optimizer: Any,
    per_device_rows: int,
    seq_len: int,
    vocab_size: int,
    start: int,
    packed: bool = False,
    compiler: str | None = None,
    fraction: float = MEMORY_FRACTION,
) -> ProbeResult:
    """The largest micro-batch (a divisor of `per_device_rows`) whose measured peak on this CUDA device, plus the
    optimizer state not yet allocated, stays within `fraction` of the device's memory (of the share
    `torch.cuda.set_per_process_memory_fraction` allows), on every rank. `model`: the Fabric-wrapped training
    module; `objective`: the loop's objective; `start`: the estimate's pick; `packed`: whether rows are packed
    (they attend through another path); `compiler`: the run's block compiler ("torch", "thunder" or None)."""
    device = fabric.device
    if device.type != "cuda":
        raise ValueError(f"the memory probe measures CUDA memory; this run is on {device}")
    started = time.perf_counter()
    total = torch.cuda.get_device_properties(device).total_memory
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    device_bytes = total * (get_fraction(device) if get_fraction is not None else 1.0)
    with leaves_no_trace(model, device):
        extra = optimizer_state_bytes(optimizer, device)
        if fabric.world_size > 1:
            extra = int(fabric.all_reduce(_scalar(extra, device), reduce_op="max").item())
            device_bytes = fabric.all_reduce(_scalar(device_bytes, device), reduce_op="min").item()

        def measure(size: int) -> int | None:
            torch.cuda.empty_cache()  # what an earlier candidate left cached must not fragment this one
            torch.cuda.reset_peak_memory_stats(device)
            # Whether the passes completed is agreed over the ranks, so all of them skip the reduction together.
            if not run_probe_passes(fabric, model, objective, size, per_device_rows, seq_len, vocab_size, packed):
                return None
            peak = float(torch.cuda.max_memory_allocated(device))
            if fabric.world_size > 1:
                peak = fabric.all_reduce(_scalar(peak, device), reduce_op="max").item()
            return int(peak)

        result = search_micro_batch(measure, per_device_rows, start, device_bytes, extra, fraction)
        if compiler == "torch" or packed:
            # Dynamo saw the probe's batch sizes: after a second size of a frame it recompiles that frame with a
            # dynamic batch dimension, and training would keep running that less specialised code, one step
            # closer to dynamo's recompile limit. Forgetting every compiled frame lets training compile for its
            # own shapes, exactly as a run without the probe does (paying that compilation once more). Packed
            # rows go through the compiled flex_attention even with eager blocks. thunder (--compiler thunder)
            # keeps one trace per input shape and never generalises, so its traces of the probe's shapes are
            # harmless and stay.
            torch._dynamo.reset()
    result.seconds = time.perf_counter() - started
    return result


def _scalar(value: float, device: torch.device) -> torch.Tensor:
    # float64: byte counts stay exact (float32 would round them to 8 MiB steps at 100 GiB).
    return torch.tensor(float(value), dtype=torch.float64, device=device)
