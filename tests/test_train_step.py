"""`train_step` queues a step without reading anything back from the device; `StepMetrics.resolve` reads its metrics
once. On CPU: the resolved metrics are those of the global batch, and a batch without trained tokens trains nothing
and is reported at resolve time; the trained positions found while collating select what the loss trains. Marked
`gpu`: the step, the supervised loss included, makes no host synchronisation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from litft.errors import TrainingStopped
from litft.training.config import TrainConfig
from litft.training.loop import StepMetrics, to_device, train_step
from litft.training.loss import IGNORE_INDEX
from litft.training.memory_probe import synthetic_rows
from litft.training.objectives import SupervisedObjective
from litft.training.optim import make_optimizer

VOCAB_SIZE = 512  # tiny_llama_dir's


def training_module(checkpoint: Path, accelerator: str, precision: str = "32-true"):
    """A LoRA model without dropout (so two forward passes agree) inside the training loss, wrapped by Fabric as
    `run_finetune` wraps it."""
    from lightning.fabric import Fabric

    from litft.adapters.lora import LoRAConfig
    from litft.commands.finetune import load_for_training
    from litft.training.loss import CausalLMObjective

    fabric = Fabric(accelerator=accelerator, devices=1, precision=precision)
    torch.manual_seed(0)
    lora = LoRAConfig(rank=4, targets=["all-linear"])
    model = load_for_training("lora", checkpoint, torch.float32, fabric.device, lora, None)
    return fabric, fabric.setup_module(CausalLMObjective(model))


def micro_batches(objective, device: torch.device, masked_positions: int, seed: int = 0) -> list[dict]:
    """Two micro-batches of two rows of 24 tokens whose first `masked_positions` targets are not trained."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        rows = synthetic_rows(2, 24, VOCAB_SIZE, False, generator)
        for row in rows:
            row[0]["targets"][:masked_positions] = IGNORE_INDEX
        batches.append(to_device(objective.collate(rows), device))
    return batches


def test_resolved_metrics_are_the_global_batch_averages(tiny_llama_dir):
    fabric, wrapped = training_module(tiny_llama_dir, "cpu")
    objective = SupervisedObjective(pad_id=0)
    config = TrainConfig(lr=1e-2, max_norm=1e9)  # never clips, but reports the gradient norm
    optimizer = fabric.setup_optimizers(make_optimizer(wrapped, config))
    batches = micro_batches(objective, fabric.device, masked_positions=5)
    # What the step should report, computed directly from the weights before it.
    units = sum(objective.count(batch) for batch in batches)
    loss = sum(objective.loss_sum(wrapped, batch)[0] for batch in batches) / units
    loss.backward()
    trained = [p for p in wrapped.parameters() if p.requires_grad]
    expected_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in trained]))
    optimizer.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in trained]

    metrics = train_step(fabric, wrapped, optimizer, objective, batches, config)
    assert isinstance(metrics, StepMetrics)
    resolved = metrics.resolve()
    assert resolved.keys() == {"loss", "tokens", "grad_norm"}
    assert units == 4 * (24 - 5)
    assert resolved["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert resolved["tokens"] == sum(batch["num_tokens"] for batch in batches) == 4 * 24
    assert resolved["grad_norm"] == pytest.approx(expected_norm.item(), rel=1e-5)
    assert any(not torch.equal(p, previous) for p, previous in zip(trained, before))  # the optimizer stepped
    assert all(p.grad is None for p in trained)


def test_a_global_batch_without_trained_tokens_trains_nothing_and_is_reported_at_resolve(tiny_llama_dir):
    fabric, wrapped = training_module(tiny_llama_dir, "cpu")
    objective = SupervisedObjective(pad_id=0)
    config = TrainConfig(lr=1e-2)
    optimizer = fabric.setup_optimizers(make_optimizer(wrapped, config))
    gradients: list[torch.Tensor] = []
    for p in wrapped.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: gradients.append(p.grad.clone()))

    metrics = train_step(fabric, wrapped, optimizer, objective, micro_batches(objective, fabric.device, 24), config)
    assert gradients and all(torch.equal(grad, torch.zeros_like(grad)) for grad in gradients)  # zero, not NaN
    assert all(torch.isfinite(p).all() for p in wrapped.parameters())
    with pytest.raises(TrainingStopped, match="a global batch has no trained token"):
        metrics.resolve()


def test_collated_trained_positions_give_the_loss_over_trained_targets(tiny_llama_dir):
    """The positions `SupervisedObjective.collate` finds on the host are the targets that are not -100, and the loss
    over them is the dense cross-entropy that ignores the rest."""
    fabric, wrapped = training_module(tiny_llama_dir, "cpu")
    objective = SupervisedObjective(pad_id=0)
    batch = micro_batches(objective, fabric.device, masked_positions=7)[0]
    flat_targets = batch["targets"].reshape(-1)
    assert torch.equal(batch["trained_positions"], torch.nonzero(flat_targets != IGNORE_INDEX).squeeze(1))
    model = wrapped.module.model
    with torch.no_grad():
        loss, _ = objective.loss_sum(wrapped, batch)
        logits = model.logits(model.hidden_states(batch["input_ids"])).float()
        dense = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), flat_targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
    torch.testing.assert_close(loss, dense, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
def test_a_step_on_the_gpu_makes_no_host_synchronisation(tiny_llama_dir):
    fabric, wrapped = training_module(tiny_llama_dir, "cuda", "bf16-mixed")
    objective = SupervisedObjective(pad_id=0)
    config = TrainConfig(lr=1e-2, max_norm=1.0)  # clipping on: the gradient norm stays on the device too
    optimizer = fabric.setup_optimizers(make_optimizer(wrapped, config))
    steps = [micro_batches(objective, fabric.device, masked_positions=5, seed=seed) for seed in range(3)]
    torch.cuda.synchronize()
    train_step(fabric, wrapped, optimizer, objective, steps[0], config).resolve()  # first-call set-up, unchecked
    queued = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batches in steps[1:]:
            queued.append(train_step(fabric, wrapped, optimizer, objective, batches, config))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for metrics in queued:
        # Copied into pinned host memory by the step itself: reading step 1 does not wait for step 2.
        assert metrics.ready is not None and metrics.values.is_pinned()
        resolved = metrics.resolve()
        assert resolved.keys() == {"loss", "tokens", "grad_norm"}
        assert math.isfinite(resolved["loss"]) and resolved["loss"] > 0 and resolved["grad_norm"] > 0
