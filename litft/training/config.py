"""The settings every fine-tuning recipe shares: `--train.*` and `--eval.*`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from litft.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw", "sgd")


@dataclass
class TrainConfig:
    """How to train.

    Args:
        global_batch_size: Samples (or packed rows) per optimizer step, summed over devices and accumulation.
        micro_batch_size: Samples per forward pass on one device; gradient accumulation is
            global_batch_size / (micro_batch_size * devices). "auto": the largest that fits in 90% of the device:
            the memory estimate picks (see --dry_run), and on a GPU a short probe of real steps confirms or corrects.
        epochs: Passes over the training data (ignored when max_steps is reached first).
        max_steps: Stop after this many optimizer steps.
        max_time: Stop after this many seconds of training (a checkpoint is saved first).
        lr: Peak learning rate.
        lr_scheduler: "cosine", "linear" or "constant" after the warm-up.
        warmup_steps: Linear warm-up from 0 to lr over this many steps.
        min_lr_ratio: The schedule ends at lr * min_lr_ratio.
        weight_decay: Decoupled weight decay (AdamW).
        beta1: Adam beta1.
        beta2: Adam beta2.
        max_norm: Clip the global gradient norm to this value (None: no clipping).
        optimizer: "adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw" (bitsandbytes) or "sgd".
        activation_checkpointing: Recompute each decoder block in the backward pass instead of storing it; "offload"
            also keeps each block's saved input in host memory until the backward needs it.
        checkpointed_blocks: With activation_checkpointing, checkpoint only the first this many decoder blocks and
            let the others keep their activations: faster (less recomputation), more memory. None: every block.
        mlp_tile_tokens: Run each MLP over chunks of this many tokens when a micro-batch holds more, so one chunk's
            intermediate activations exist at a time (for sequences of 100k tokens and more; costs one more MLP
            forward per chunk in the backward). None: whole micro-batches.
        router_aux_loss_coef: Mixtures of experts: add this times the routers' load-balancing loss (Switch
            Transformer's, as transformers computes it with `output_router_logits`) to each micro-batch's loss, so
            that training keeps the experts evenly used. 0: none (transformers' default); the models' own configs
            suggest 0.02 (Mixtral) and 0.001 (Qwen-MoE). Supervised fine-tuning only.
        save_interval: Save a resumable checkpoint every this many steps (None: only at the end).
        log_interval: Log metrics every this many steps.
    """

    global_batch_size: int = 16
    micro_batch_size: int | Literal["auto"] = 1
    epochs: int = 1
    max_steps: int | None = None
    max_time: float | None = None
    lr: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    max_norm: float | None = 1.0
    optimizer: str = "adamw"
    activation_checkpointing: bool | Literal["offload"] = False
    checkpointed_blocks: int | None = None
    mlp_tile_tokens: int | None = None
    router_aux_loss_coef: float = 0.0
    save_interval: int | None = None
    log_interval: int = 1

    def validate(self) -> None:
        if self.micro_batch_size != "auto" and self.micro_batch_size < 1:
            raise ConfigError(f"--train.micro_batch_size {self.micro_batch_size}: must be at least 1 (or auto)")
        if self.global_batch_size < 1:
            raise ConfigError(f"--train.global_batch_size {self.global_batch_size}: must be at least 1")
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            raise ConfigError(f"--train.lr_scheduler {self.lr_scheduler!r}: choose cosine, linear or constant")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--train.optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.lr <= 0:
            raise ConfigError(f"--train.lr {self.lr}: must be positive")
        if self.checkpointed_blocks is not None and self.checkpointed_blocks < 0:
            raise ConfigError(f"--train.checkpointed_blocks {self.checkpointed_blocks}: must be 0 or more (None: every block)")
        if self.checkpointed_blocks is not None and not self.activation_checkpointing:
            raise ConfigError("--train.checkpointed_blocks needs --train.activation_checkpointing true (or offload)")
        if self.mlp_tile_tokens is not None and self.mlp_tile_tokens < 1:
            raise ConfigError(f"--train.mlp_tile_tokens {self.mlp_tile_tokens}: must be at least 1 (None: no tiling)")
        if self.epochs < 1:
            raise ConfigError(f"--train.epochs {self.epochs}: must be at least 1")
        if self.max_time is not None and self.max_time <= 0:
            raise ConfigError(
                f"--train.max_time {self.max_time}: must be a positive number of seconds (None: no limit)")
        if self.warmup_steps < 0:
            raise ConfigError(f"--train.warmup_steps {self.warmup_steps}: must be 0 or more")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--train.min_lr_ratio {self.min_lr_ratio}: must be between 0 and 1")
        if self.weight_decay < 0:
            raise ConfigError(f"--train.weight_decay {self.weight_decay}: must be 0 or more")
        for flag, beta in (("--train.beta1", self.beta1), ("--train.beta2", self.beta2)):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"{flag} {beta}: must be at least 0 and below 1")
        if self.router_aux_loss_coef < 0:
            raise ConfigError(f"--train.router_aux_loss_coef {self.router_aux_loss_coef}: must be 0 or more")
        if self.router_aux_loss_coef and self.activation_checkpointing == "offload":
            raise ConfigError(
                "--train.router_aux_loss_coef with --train.activation_checkpointing offload is not supported (the "
                "offloaded forward runs without autograd, so the routers' loss would not train); use "
                "--train.activation_checkpointing true")
        if self.max_norm is not None and self.max_norm <= 0:
            raise ConfigError(f"--train.max_norm {self.max_norm}: must be positive (None: no clipping)")
        if self.save_interval is not None and self.save_interval < 1:
            raise ConfigError(f"--train.save_interval {self.save_interval}: must be at least 1 (None: only at the end)")
        if self.log_interval < 1:
            raise ConfigError(f"--train.log_interval {self.log_interval}: must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(
                f"--train.max_steps {self.max_steps}: must be at least 1 (None: as many as --train.epochs take)")


@dataclass
class EvalConfig:
    """When and how to evaluate.

    Args:
        interval: Compute the validation loss every this many steps (None: only at the end).
        max_batches: Evaluate on at most this many validation micro-batches (None: all).
        sample_prompt: A prompt generated from at each evaluation, to watch the model change (None: none).
        max_new_tokens: Length of that sample generation.
    """

    interval: int | None = None
    max_batches: int | None = None
    sample_prompt: str | None = None
    max_new_tokens: int = 50

    def validate(self) -> None:
        if self.interval is not None and self.interval < 1:
            raise ConfigError(f"--eval.interval {self.interval}: must be at least 1 (None: only at the end)")
        if self.max_batches is not None and self.max_batches < 1:
            raise ConfigError(f"--eval.max_batches {self.max_batches}: must be at least 1 (None: all)")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--eval.max_new_tokens {self.max_new_tokens}: must be at least 1")
