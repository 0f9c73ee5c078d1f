"""What litft's Triton kernels (NF4 dequantization, adapter dropout, the LoRA GEMM, the loss) ask before running."""

from __future__ import annotations

import contextlib
import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1): the kernels run on CPU tensors, as the CPU tests run them."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernels_run_on(tensor: torch.Tensor) -> bool:
    """Whether a kernel can take `tensor`: Triton importable, and the tensor on a GPU or under the interpreter."""
    return (tensor.is_cuda or interpreting()) and triton_available()


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """The programs a persistent kernel launches per wave: the GPU's multiprocessors (4 under the interpreter)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def launching_on(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current device: around a launch, the device of the tensor it works on (a tensor on
    another GPU than the current one must not run there); nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
