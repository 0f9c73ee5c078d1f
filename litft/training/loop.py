"""The one training loop every fine-tuning method shares (LoRA, QLoRA, full, and the preference objectives).

What varies between methods is the `Objective`: how a micro-batch turns into a summed loss and how many units
(trained tokens, preference pairs) it contributes to the normaliser. The loop does the rest the same way for all:

* A global batch of `global_batch_size` rows is fixed by the seed and the epoch alone, then split into
  micro-batches across devices and accumulation steps. Every micro-batch's summed loss is divided by the number of
  units in the *whole global batch* (all-reduced), so the gradient is the same however the batch is split: one device
  or eight, one micro-batch or sixteen, packed or padded.
* Resumable checkpoints hold the trainable weights, optimizer, scheduler, position in the data and RNG states; they
  are written under a temporary name and renamed into place.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from lightning.fabric import Fabric
from torch import nn

from litft.errors import ConfigError, TrainingStopped
from litft.training.config import EvalConfig, TrainConfig

Row = Sequence[Any]  # one training row: a list of samples (several when packed)
Batch = dict[str, Any]


class Objective(Protocol):
    """How one method trains: collate rows, count normaliser units, compute the summed loss of a micro-batch, and
    say what a validation measured (perplexity means something for next-token loss, not for a preference loss)."""

    def collate(self, rows: list[Row]) -> Batch: ...

    def row_length(self, row: Row) -> int: ...

    def count(self, batch: Batch) -> torch.Tensor: ...

    def loss_sum(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Validation metrics computed from the averaged ones (SFT: perplexity), logged beside them."""

    def summary(self, metrics: dict[str, float]) -> str:
        """The validation metrics (`evaluate`'s result) in a few words for the log."""


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint so a resumed run continues at the same batch."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches of `epoch` already consumed
    tokens_seen: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def global_batch_order(num_rows: int, global_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The row indices of every global batch of an epoch: a permutation seeded by (seed, epoch), cut into full
    global batches (the incomplete remainder is dropped so every device always has work)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_rows, generator=generator).tolist()
    return [order[i : i + global_batch_size] for i in range(0, num_rows - global_batch_size + 1, global_batch_size)]


def split_global_batch(
    rows: list[Row], world_size: int, rank: int, micro_batch_size: int, row_length: Callable[[Row], int]
) -> list[list[Row]]:
    """This device's micro-batches of a global batch. Rows are sorted by length first so each micro-batch pads to
    similar lengths; the order inside a global batch does not change its gradient."""
    ordered = sorted(rows, key=row_length, reverse=True)
    mine = ordered[rank::world_size]
    return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def check_batch_sizes(config: TrainConfig, world_size: int, num_rows: int) -> int:
    per_step = config.micro_batch_size * world_size
    if config.global_batch_size % per_step:
        raise ConfigError(
            f"--train.global_batch_size {config.global_batch_size} must be a multiple of --train.micro_batch_size "
            f"({config.micro_batch_size}) x devices ({world_size})"
        )
    if num_rows < config.global_batch_size:
        raise ConfigError(
            f"the training set has {num_rows} rows, fewer than --train.global_batch_size {config.global_batch_size}; "
            "lower the batch size or add data"
        )
    return config.global_batch_size // per_step


def steps_per_epoch(num_rows: int, global_batch_size: int) -> int:
    return num_rows // global_batch_size


def total_steps(config: TrainConfig, num_rows: int) -> int:
    steps = config.epochs * steps_per_epoch(num_rows, config.global_batch_size)
    return min(steps, config.max_steps) if config.max_steps else steps


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_folder(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def latest_checkpoint(out_dir: Path) -> Path | None:
    folder = checkpoint_folder(out_dir)
    candidates = sorted(p for p in folder.glob("step-*") if not p.name.startswith("."))
    return candidates[-1] if candidates else None


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


CHECKPOINT_METADATA = "trainer_state.pt"  # beside the tensors: scheduler, progress, RNG states


def is_checkpoint(path: Path) -> bool:
    return (path / CHECKPOINT_METADATA).is_file()


class TrainingState:
    """Saves and restores everything a resumed run needs, atomically (written under a temporary name, then
    renamed).

    The tensors (trained weights, optimizer state) go through torch's distributed checkpoint (DCP), keyed by
    parameter name: under FSDP2 every rank writes its own shards in parallel, under DDP rank 0 writes the one
    replica. DCP reshards on load, so a checkpoint written by any strategy and world size resumes under any other
    (FSDP2 on 8 GPUs -> DDP on 2 -> one device). Adapter runs save only the trained tensors: the frozen base is
    already on disk. Fabric's own `save` is not used because it can neither filter a sharded checkpoint nor load
    one into an unsharded model."""

    def __init__(self, fabric: Fabric, model: nn.Module, optimizer, scheduler, progress: Progress, full_weights: bool):
        self.fabric, self.scheduler, self.progress = fabric, scheduler, progress
        # The unwrapped module and optimizer: DCP names tensors by their parameter names, with no wrapper prefix.
        self.module: nn.Module = getattr(model, "module", model)
        self.optimizer: torch.optim.Optimizer = getattr(optimizer, "optimizer", optimizer)
        self.full_weights = full_weights

    def _tensor_state(self) -> dict[str, Any]:
        """The current tensors by name (sharded DTensors under FSDP2): the source of a save, the target of a load."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model_state = get_model_state_dict(self.module)
        if not self.full_weights:
            trained = {name for name, p in self.module.named_parameters() if p.requires_grad}
            model_state = {name: value for name, value in model_state.items() if name in trained}
        return {"model": model_state, "optimizer": get_optimizer_state_dict(self.module, self.optimizer)}

    def save(self, out_dir: Path) -> Path:
        import torch.distributed.checkpoint as dcp

        fabric = self.fabric
        target = checkpoint_folder(out_dir) / f"step-{self.progress.step:08d}"
        tmp = target.with_name(f".{target.name}.tmp")
        if fabric.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        fabric.barrier()
        with warnings.catch_warnings():  # DCP warns that a run without a process group saves from one process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(self._tensor_state(), checkpoint_id=tmp)
        if fabric.global_rank == 0:
            metadata = {"scheduler": self.scheduler.state_dict(), "progress": asdict(self.progress), "rng": rng_states()}
            torch.save(metadata, tmp / CHECKPOINT_METADATA)
        fabric.barrier()
        if fabric.global_rank == 0:
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        fabric.barrier()
        return target

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = self._tensor_state()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path)
        set_model_state_dict(self.module, state["model"], options=StateDictOptions(strict=self.full_weights))
        set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"])
        metadata = torch.load(path / CHECKPOINT_METADATA, weights_only=True)
        self.scheduler.load_state_dict(metadata["scheduler"])
        self.progress.__dict__.update(metadata["progress"])
        restore_rng_states(metadata["rng"])


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def to_device(batch: Batch, device: torch.device) -> Batch:
    def move(value):
        if isinstance(value, torch.Tensor):
            # From pageable memory a copy to the GPU waits for the work queued before it; from pinned memory it
            # does not, and the host goes on collating while the device trains (`fit` reads metrics a step late).
            if device.type == "cuda" and value.device.type == "cpu":
                value = value.pin_memory()
            return value.to(device, non_blocking=True)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    return move(batch)


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return 0.0


@dataclass
class FitResult:
    progress: Progress
    final_val_loss: float | None
    stopped_early: str | None = None


@dataclass
class _PendingStep:
    """A step queued on the device whose metrics `fit` has not read yet, with what it knew when it queued it."""

    metrics: StepMetrics
    step: int
    epoch: int
    lr: float
    peak_memory_gib: float
    started: float  # time.perf_counter() when the host began collating the step
    queued: float  # time.perf_counter() when `train_step` returned
    start_event: torch.cuda.Event | None  # on a GPU: recorded before the step's work
    after_pause: bool  # the first step, or the first after an evaluation or a checkpoint (nothing was pending)


def fit(
    fabric: Fabric,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    objective: Objective,
    train_rows: list[Row],
    val_rows: list[Row] | None,
    train_config: TrainConfig,
    eval_config: EvalConfig,
    out_dir: Path,
    seed: int,
    state: TrainingState,
    sample_fn: Callable[[], str] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FitResult:
    """Trains until the epochs, `max_steps` or `max_time` run out, or `should_stop()` (a preemption signal) says so;
    saves a resumable checkpoint at every `save_interval` and at the end.

    A step's metrics are read one step late, once the next step is queued, so the device never waits for the host
    to collate a batch. Every step is read before anything that needs its metrics or its weights: an evaluation, a
    checkpoint, the last step and a stop."""
    progress = state.progress
    world_size, rank = fabric.world_size, fabric.global_rank
    accumulation = check_batch_sizes(train_config, world_size, len(train_rows))
    steps = total_steps(train_config, len(train_rows))
    fabric.print(
        f"training: {len(train_rows)} rows, {steps} steps of {train_config.global_batch_size} rows "
        f"({world_size} device(s) x {train_config.micro_batch_size} x {accumulation} accumulation)",
        file=sys.stderr,
    )
    progress_bar = _progress_bar(fabric, steps, progress.step)
    stopped: str | None = None
    started = time.perf_counter() - progress.train_seconds
    last_saved_step = progress.step
    pending: _PendingStep | None = None
    previous_ready: torch.cuda.Event | None = None  # the last read step's end, on a GPU

    def step_seconds(step: _PendingStep) -> float:
        """How long a step took. On a GPU, from the events it recorded in the device's stream: from the previous
        step's end to its own (a step that waited for the host counts that wait), or from its own start after a
        pause, which must not count. The host's clock cannot tell: it reads a step when the next is queued, and
        reads two at once before a pause. Elsewhere a step has ended when `train_step` returns."""
        if step.metrics.ready is None:
            return step.queued - step.started
        begin = step.start_event if step.after_pause or previous_ready is None else previous_ready
        return begin.elapsed_time(step.metrics.ready) / 1e3

    def report(step: _PendingStep) -> None:
        """Reads a step's metrics (waiting for the device to finish it), logs them and stops on a non-finite loss."""
        nonlocal previous_ready
        metrics = step.metrics.resolve()
        tokens = int(metrics.pop("tokens"))
        progress.tokens_seen += tokens
        now = time.perf_counter()
        elapsed = step_seconds(step)
        previous_ready = step.metrics.ready
        progress.train_seconds = now - started
        metrics.update(
            step=step.step,
            epoch=step.epoch,
            lr=step.lr,
            tokens_per_second=tokens / max(elapsed, 1e-9),
            tokens_seen=progress.tokens_seen,
            peak_memory_gib=step.peak_memory_gib,
        )
        if not math.isfinite(metrics["loss"]):
            last = latest_checkpoint(out_dir)
            raise TrainingStopped(
                f"the loss became {metrics['loss']} at step {step.step}; lower --train.lr or check the data"
                + (f"; the last good checkpoint is {last}" if last else "")
            )
        if step.step % train_config.log_interval == 0 or step.step == steps:
            fabric.log_dict({f"train/{k}": v for k, v in metrics.items()}, step=step.step)
            progress.history.append({"step": step.step, "train_loss": metrics["loss"]})
            if progress_bar is None:  # a log file: a line per logged step (rank 0's; fabric.print skips the others)
                memory = metrics["peak_memory_gib"]  # 0 where the device does not report it (CPU)
                fabric.print(
                    f"step {step.step}/{steps}: loss {metrics['loss']:.4f}, lr {metrics['lr']:.2e}, "
                    f"{metrics['tokens_per_second']:,.0f} tok/s"
                    + (f", peak memory {memory:.1f} GiB" if memory else ""),
                    file=sys.stderr,
                )
        if progress_bar is not None:
            progress_bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{metrics['tokens_per_second']:.0f}",
                mem=f"{metrics['peak_memory_gib']:.1f}G",
            )
            progress_bar.update(1)

    def report_pending() -> None:
        nonlocal pending
        if pending is not None:
            step, pending = pending, None
            report(step)

    try:
        while progress.step < steps and stopped is None:
            batches = global_batch_order(len(train_rows), train_config.global_batch_size, seed, progress.epoch)
            while progress.batch_in_epoch < len(batches) and progress.step < steps:
                step_started = time.perf_counter()
                start_event = None
                if fabric.device.type == "cuda":
                    start_event = torch.cuda.Event(enable_timing=True)
                    start_event.record()
                rows = [train_rows[i] for i in batches[progress.batch_in_epoch]]
                micro_batches = [
                    to_device(objective.collate(chunk), fabric.device)
                    for chunk in split_global_batch(rows, world_size, rank, train_config.micro_batch_size, objective.row_length)
                ]
                try:
                    step_metrics = train_step(fabric, model, optimizer, objective, micro_batches, train_config)
                except torch.OutOfMemoryError:
                    raise TrainingStopped(out_of_memory_advice(train_config, micro_batches, out_dir)) from None
                step_queued = time.perf_counter()
                scheduler.step()
                progress.step += 1
                progress.batch_in_epoch += 1
                queued_step = _PendingStep(
                    step_metrics, progress.step, progress.epoch, lr=optimizer.param_groups[0]["lr"],
                    peak_memory_gib=_memory_gib(fabric.device), started=step_started, queued=step_queued,
                    start_event=start_event, after_pause=pending is None,
                )
                report_pending()  # the previous step, only now that this one is queued: the device goes on meanwhile
                pending = queued_step
                progress.train_seconds = time.perf_counter() - started
                evaluating = bool(val_rows and eval_config.interval and progress.step % eval_config.interval == 0)
                evaluating = evaluating and progress.step < steps
                saving = bool(train_config.save_interval and progress.step % train_config.save_interval == 0)
                if evaluating or saving or progress.step == steps:
                    report_pending()
                if evaluating:
                    evaluate_and_log(fabric, model, objective, val_rows, train_config, eval_config, progress, sample_fn)
                if saving:
                    state.save(out_dir)
                    last_saved_step = progress.step
                if train_config.max_time is not None and progress.train_seconds >= train_config.max_time:
                    report_pending()
                    stopped = "max_time"
                    break
                if should_stop is not None and should_stop():
                    report_pending()
                    stopped = "signal"
                    break
            else:
                if progress.batch_in_epoch >= len(batches):
                    progress.epoch += 1
                    progress.batch_in_epoch = 0
        report_pending()  # a safety net: every way out of the loop above has read its last step already
    finally:
        if progress_bar is not None:
            progress_bar.close()  # before any error is printed, so it starts on a line of its own
    final_val = None
    if val_rows and stopped is None:
        final_val = evaluate_and_log(fabric, model, objective, val_rows, train_config, eval_config, progress, sample_fn)
    if progress.step != last_saved_step or stopped is not None:
        state.save(out_dir)
    return FitResult(progress, final_val, stopped)


def out_of_memory_advice(config: TrainConfig, micro_batches: list[Batch], out_dir: Path) -> str:
    """What to lower after the device ran out of memory, most effective first."""
    longest = max(int(b["input_ids"].shape[1]) for b in micro_batches)
    advice = [f"--train.micro_batch_size (now {config.micro_batch_size}; keep --train.global_batch_size, accumulation grows)"]
    advice.append(f"--data.max_seq_length (the longest row here has {longest} tokens)")
    if not config.activation_checkpointing:
        advice.append("--train.activation_checkpointing true")
    advice.append("litft finetune qlora (a 4-bit base) or --strategy fsdp over several GPUs")
    last = latest_checkpoint(out_dir)
    kept = f"; the last good checkpoint is {last}" if last else ""
    return "the GPU ran out of memory; lower, in this order: " + "; ".join(advice) + kept


@dataclass
class StepMetrics:
    """A training step's metrics, read without waiting for anything queued after the step: on a GPU the step's last
    work copies them into pinned host memory and records `ready`, and `resolve` waits for that event alone (a read
    queued later would wait for the steps queued meanwhile too)."""

    names: list[str]  # of the summed metrics at the front of `values`, "loss" first
    values: torch.Tensor  # the summed metrics, the token count, the global unit count, then the gradient norm if any
    has_grad_norm: bool
    ready: torch.cuda.Event | None  # on a GPU: recorded after the copy; it also marks the step's end for timing

    def resolve(self) -> dict[str, float]:
        """The metrics averaged over the global batch, the step's token count ("tokens") and, when clipping, the
        gradient norm."""
        if self.ready is not None:
            self.ready.synchronize()
        read = self.values.tolist()
        count = len(self.names)
        summed, tokens, units = read[:count], read[count], read[count + 1]
        if units == 0:
            raise TrainingStopped(
                "a global batch has no trained token; check the data masking (--data.train_on_prompt)"
            )
        result = {name: value / units for name, value in zip(self.names, summed)}
        result["tokens"] = tokens
        if self.has_grad_norm:
            result["grad_norm"] = read[count + 2]
        return result


def _sum_over_devices(fabric: Fabric, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all processes, in place. Not `fabric.all_reduce`: that runs a barrier first, and a NCCL
    barrier blocks the host until the device has finished all its queued work."""
    if fabric.world_size > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def train_step(
    fabric: Fabric,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    micro_batches: list[Batch],
    config: TrainConfig,
) -> StepMetrics:
    """One optimizer step over this device's micro-batches, queued without reading anything back from the device;
    the returned metrics are averaged over the global batch once resolved."""
    local_units = sum(objective.count(b) for b in micro_batches)
    global_units = _sum_over_devices(fabric, local_units.float())
    # DDP and FSDP average gradients over devices; scaling by the world size turns that average into a sum. The
    # clamp avoids reading the unit count on the host: a global batch without trained tokens gets a zero loss and
    # zero gradients instead of NaN, and `resolve` reports it as an error. That step's optimizer update is never
    # saved: `fit` resolves every step before a checkpoint, so the error stops training first.
    scale = fabric.world_size / global_units.clamp(min=1)
    loss_total = torch.zeros((), device=fabric.device)
    metric_totals: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(micro_batches):
        is_last = index == len(micro_batches) - 1
        with fabric.no_backward_sync(model, enabled=not is_last):
            loss_sum, metrics = objective.loss_sum(model, batch)
            fabric.backward(loss_sum * scale)
        loss_total += loss_sum.detach().float()
        for name, value in metrics.items():
            metric_totals[name] = metric_totals.get(name, 0) + value.detach().float()
    grad_norm = None
    if config.max_norm is not None:
        from torch.distributed.tensor import DTensor

        grad_norm = fabric.clip_gradients(model, optimizer, max_norm=config.max_norm, error_if_nonfinite=False)
        if isinstance(grad_norm, DTensor):  # under FSDP2; a collective, not a read
            grad_norm = grad_norm.full_tensor()
        grad_norm = grad_norm.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # `torch.full`, not `torch.tensor`: copying a host value to the device would wait for the device.
    local_tokens = torch.full((), float(sum(b["num_tokens"] for b in micro_batches)), device=loss_total.device)
    # One all-reduce for every metric and the token count.
    totals = _sum_over_devices(fabric, torch.stack([loss_total, *metric_totals.values(), local_tokens]))
    values = [totals, global_units.reshape(1).to(totals)]
    if grad_norm is not None:
        values.append(grad_norm.reshape(1).to(totals))  # on the host under FSDP's CPU offload
    values = torch.cat(values)
    ready = None
    # A step captured into a CUDA graph (benchmarks/bench.py --cuda_graph) leaves its metrics on the device.
    if values.is_cuda and not torch.cuda.is_current_stream_capturing():
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        values = host.copy_(values, non_blocking=True)
        ready = torch.cuda.Event(enable_timing=True)
        ready.record()
    return StepMetrics(["loss", *metric_totals], values, grad_norm is not None, ready)


@torch.no_grad()
def evaluate(
    fabric: Fabric, model: nn.Module, objective: Objective, val_rows: list[Row], train_config: TrainConfig,
    eval_config: EvalConfig,
) -> dict[str, float]:
    """Validation loss over (at most `max_batches` micro-batches per device of) the validation rows, all-reduced."""
    from torchmetrics.aggregation import SumMetric

    was_training = model.training
    model.eval()
    loss_sum, units = SumMetric().to(fabric.device), SumMetric().to(fabric.device)
    extra: dict[str, SumMetric] = {}
    mine = val_rows[fabric.global_rank :: fabric.world_size]
    size = train_config.micro_batch_size
    chunks = [mine[i : i + size] for i in range(0, len(mine), size)]
    if eval_config.max_batches is not None:
        chunks = chunks[: eval_config.max_batches]
    for chunk in chunks:
        batch = to_device(objective.collate(chunk), fabric.device)
        loss, metrics = objective.loss_sum(model, batch)
        loss_sum.update(loss.float())
        units.update(objective.count(batch).float())
        for name, value in metrics.items():
            extra.setdefault(name, SumMetric().to(fabric.device)).update(value.float())
    model.train(was_training)
    total_units = float(units.compute())
    if total_units == 0:
        return {}
    result = {"loss": float(loss_sum.compute()) / total_units}
    for name, metric in extra.items():
        result[name] = float(metric.compute()) / total_units
    return result


def evaluate_and_log(
    fabric: Fabric, model: nn.Module, objective: Objective, val_rows: list[Row], train_config: TrainConfig,
    eval_config: EvalConfig, progress: Progress, sample_fn: Callable[[], str] | None,
) -> float | None:
    metrics = evaluate(fabric, model, objective, val_rows, train_config, eval_config)
    if not metrics:
        return None
    metrics.update(objective.derived_metrics(metrics))
    fabric.log_dict({f"val/{k}": v for k, v in metrics.items()}, step=progress.step)
    progress.history.append({"step": progress.step, "val_loss": metrics["loss"]})
    message = f"step {progress.step}: validation {objective.summary(metrics)}"
    if sample_fn is not None:
        message += f"\n  sample: {sample_fn()!r}"
    fabric.print(message, file=sys.stderr)
    return metrics["loss"]


def _progress_bar(fabric: Fabric, total: int, initial: int):
    """rank 0's progress bar where stderr is a terminal. Not in a log file (a SLURM job's, a pipe, CI): a bar redraws
    itself with carriage returns, which a file keeps as one ever-longer line, so there each logged step gets a line
    of its own instead."""
    if fabric.global_rank != 0 or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


def plot_history(history: list[dict[str, float]], path: Path) -> Path | None:
    """The loss curve as a PNG (needs matplotlib; skipped without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    figure, axis = plt.subplots(figsize=(7, 4))
    if train:
        axis.plot(*zip(*train), label="train loss")
    if val:
        axis.plot(*zip(*val), marker="o", label="validation loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    os.replace(tmp, path)
    return path
