"""Supervised fine-tuning's objective: next-token cross-entropy, summed over trained tokens.

The preference objectives (DPO, ORPO, SimPO) live in `litft.training.preference` and plug into the same loop."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from litft.models import flash_attention
from litft.training.loss import IGNORE_INDEX, find_trained_positions


class SupervisedObjective:
    """Units of the normaliser: trained tokens. The model passed to `loss_sum` is the Fabric-wrapped
    `CausalLMObjective`, whose forward returns the summed loss."""

    def __init__(self, pad_id: int, token_mask: bool = False) -> None:
        self.pad_id = pad_id
        # Whether batches carry the mask of real tokens, which only a mixture's load-balancing loss reads
        # (--train.router_aux_loss_coef); without it the routers count every position.
        self.token_mask = token_mask

    def collate(self, rows: list[Any]) -> dict[str, Any]:
        from litft.data import collate

        batch = collate(rows, pad_id=self.pad_id)
        lengths = torch.tensor([self.row_length(row) for row in rows])
        batch["num_tokens"] = int(lengths.sum())
        batch["trained_positions"] = find_trained_positions(batch["targets"])
        if batch["document_ids"] is not None:  # packed rows: where each document begins, found without a GPU wait
            batch["document_offsets"] = flash_attention.document_offsets(batch["document_ids"])
        if self.token_mask:  # the real tokens, padding False
            batch["token_mask"] = torch.arange(batch["input_ids"].shape[1])[None, :] < lengths[:, None]
        return batch

    @staticmethod
    def row_length(row: Any) -> int:
        return sum(len(sample["input_ids"]) for sample in row)

    @staticmethod
    def count(batch: dict[str, Any]) -> torch.Tensor:
        return (batch["targets"] != IGNORE_INDEX).sum()

    @staticmethod
    def loss_sum(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = model(
            batch["input_ids"],
            batch["targets"],
            position_ids=batch.get("position_ids"),
            document_ids=batch.get("document_ids"),
            trained_positions=batch.get("trained_positions"),
            token_mask=batch.get("token_mask"),
            document_offsets=batch.get("document_offsets"),
        )
        # A mixture's balancing loss (--train.router_aux_loss_coef), logged apart: averaged like the loss, it reads
        # as the mean balancing loss per trained token (the logged loss includes it times the coefficient).
        balancing = getattr(getattr(model, "module", model), "router_aux_loss_sum", None)
        return loss, {} if balancing is None else {"router_aux_loss": balancing}

    @staticmethod
    def derived_metrics(metrics: dict[str, float]) -> dict[str, float]:
        # The loss is the mean next-token NLL, so its exponential is the perplexity (capped so it stays finite).
        return {"perplexity": math.exp(min(metrics["loss"], 50.0))}

    @staticmethod
    def summary(metrics: dict[str, float]) -> str:
        return f"loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}"
