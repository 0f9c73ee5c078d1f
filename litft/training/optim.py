"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from litft.errors import ConfigError
from litft.training.config import TrainConfig


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = trainable_parameters(model)
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen (check --lora.targets)")
    # No weight decay on norms, biases and LoRA magnitude vectors: only matrices decay.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    betas = (config.beta1, config.beta2)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr)
    if config.optimizer == "adamw":
        fused = all(p.device.type == "cuda" for p in params)
        return torch.optim.AdamW(groups, lr=config.lr, betas=betas, fused=fused or None)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"--train.optimizer {config.optimizer} needs bitsandbytes: pip install 'litft[quantize]'") from None
    optimizer_class = {
        "adamw8bit": bnb.optim.AdamW8bit,
        "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW,
    }[config.optimizer]
    return optimizer_class(groups, lr=config.lr, betas=betas)


def lr_multiplier(step: int, total_steps: int, config: TrainConfig) -> float:
    """The factor applied to the peak lr at optimizer step `step` (0-based): linear warm-up, then the decay."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.lr_scheduler == "constant":
        return 1.0
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    if config.lr_scheduler == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, config))
