"""Folding a LoRA adapter into its base checkpoint, giving a standalone Hugging Face model.

The base is loaded unquantized in its own dtype (so a QLoRA adapter merges into the full-precision weights, not
the 4-bit ones it was trained against), the adapter is applied, each adapted weight is summed in float32 and cast
once to the output dtype, and the folder is written atomically by `litft.checkpoint.save_hf_checkpoint`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from litft.adapters.lora import lora_modules, merge_lora_
from litft.adapters.peft_format import load_peft_adapter
from litft.adapters.quantization import OUTPUT_HEAD_NAMES
from litft.checkpoint import checkpoint_dtype, load_model, read_hf_config, save_hf_checkpoint
from litft.errors import ConfigError

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str, flag: str = "--max_shard_size") -> int:
    """Bytes in a size such as `5GB`, `500MB`, `2GiB` or `1000000`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if not match or unit not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{flag} {text!r}: expected a positive size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def merge_adapter(
    checkpoint_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 10**9,
) -> Path:
    """Writes `checkpoint_dir` with the adapter of `adapter_dir` merged in to `out_dir`, in `dtype` (None: the
    checkpoint's dtype)."""
    hf_config = read_hf_config(checkpoint_dir)
    base_dtype = checkpoint_dtype(checkpoint_dir, hf_config)
    model = load_model(checkpoint_dir, dtype=base_dtype, device="cpu")
    load_peft_adapter(model, adapter_dir)
    head_adapted = any(name.rpartition(".")[2] in OUTPUT_HEAD_NAMES for name in lora_modules(model))
    out_dtype = dtype or base_dtype
    merge_lora_(model, dtype=out_dtype)
    if head_adapted and hf_config.get("tie_word_embeddings"):
        # The merged head no longer equals the input embeddings, so both must be saved.
        hf_config = {**hf_config, "tie_word_embeddings": False}
    # The chat template the adapter was trained with (litft saves it beside the adapter), so that the merged model
    # formats prompts as training did, in litft and in transformers / vLLM (which read chat_template.jinja).
    from litft.chat_templates import LITFT_TEMPLATE_FILE, TEMPLATE_FILE

    return save_hf_checkpoint(
        model, out_dir, hf_config, tokenizer_source=checkpoint_dir, dtype=out_dtype, max_shard_bytes=max_shard_bytes,
        extra_files=[adapter_dir / TEMPLATE_FILE, adapter_dir / LITFT_TEMPLATE_FILE],
    )
