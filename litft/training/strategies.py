"""Lightning Fabric set-up: accelerator, devices, nodes, strategy and precision.

Precision is split in two. The model's weights are loaded straight into their training dtype by litft's loader
("bf16-true" loads bf16 tensors), so Fabric is never asked to cast a module: casting would also cast the float32
quantization state (block scales) of 4-bit layers. Fabric keeps the mixed-precision modes (autocast, gradient
scaling), which do not touch stored weights.
"""

from __future__ import annotations

import functools
import sys

import torch
from lightning.fabric import Fabric
from torch import nn

from litft.errors import ConfigError

PRECISIONS = ("bf16-true", "16-true", "32-true", "bf16-mixed", "16-mixed")
STRATEGIES = ("auto", "single", "ddp", "fsdp")


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


def make_fabric(
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str = "32-true",
    loggers: list | None = None,
) -> Fabric:
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--accelerator cuda: no CUDA GPU is visible on this machine; use --accelerator cpu")
    multi = num_nodes > 1 or devices not in (1, "1")
    if strategy == "fsdp":
        fabric_strategy = _fsdp2_strategy()
    elif strategy == "ddp" or (strategy == "auto" and multi):
        fabric_strategy = "ddp"
    else:
        fabric_strategy = "auto"
    return Fabric(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=fabric_strategy,
        precision=precision,
        loggers=loggers,
    )


def _fsdp2_strategy():
    from lightning.fabric.strategies import ModelParallelStrategy

    from litft.training.parallel import parallelize_fsdp2

    return ModelParallelStrategy(parallelize_fn=parallelize_fsdp2, data_parallel_size="auto", tensor_parallel_size=1)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recomputes each decoder block in the backward pass. The block's `forward` is wrapped on the instance, so
    module and parameter names stay unchanged (checkpoints and adapters keep their keys)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
