"""`litft merge`: a LoRA / DoRA / QLoRA adapter folded into its base model as a standalone checkpoint."""

from __future__ import annotations

from pathlib import Path

from litft.adapters.merge import merge_adapter, parse_size
from litft.adapters.peft_format import read_adapter_config
from litft.checkpoint import DTYPES, checkpoint_dir_or_error, is_or_holds
from litft.errors import ConfigError


def merge(
    checkpoint: Path | None = None,
    adapter: Path | None = None,
    out_dir: Path | None = None,
    precision: str = "auto",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> None:
    """Merge a LoRA adapter into its base model and write a Hugging Face checkpoint that needs no adapter.

    A QLoRA adapter is merged into the full-precision base weights. The output folder is written under a temporary
    name and renamed into place, so an existing folder is never half-overwritten.

    Args:
        checkpoint: Base model folder (Hugging Face format). Defaults to the adapter's `base_model_name_or_path`
            when that is a local folder.
        adapter: Adapter folder written by `litft finetune lora|qlora` or by PEFT (adapter_config.json and
            adapter_model.safetensors).
        out_dir: Folder for the merged checkpoint.
        precision: Dtype of the merged weights: auto (the base checkpoint's), bfloat16, float16 or float32.
        max_shard_size: Largest safetensors shard, e.g. 5GB or 500MB.
        overwrite: Replace `out_dir` if it exists and is not empty.
    """
    if adapter is None:
        raise ConfigError("--adapter is required: the adapter folder to merge")
    if out_dir is None:
        raise ConfigError("--out_dir is required: the folder to write the merged model to")
    adapter_config = read_adapter_config(adapter)
    if checkpoint is None:
        recorded = adapter_config.get("base_model_name_or_path")
        if not recorded or not Path(recorded).is_dir():
            raise ConfigError(
                f"--checkpoint is required: {adapter}/adapter_config.json names no local base model folder"
            )
        checkpoint = Path(recorded)
    checkpoint = checkpoint_dir_or_error(checkpoint)
    out_dir = Path(out_dir)
    inputs = (("--checkpoint", checkpoint), ("--adapter", adapter), ("the current folder", Path.cwd()))
    for flag, folder in inputs:
        if is_or_holds(out_dir, folder):
            # Replacing out_dir would delete what it holds: the base model, the adapter, the folder we run in.
            raise ConfigError(f"--out_dir {out_dir}: must not be {flag} or a folder holding it; choose a new folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ConfigError(
            f"--out_dir {out_dir} exists and is not empty; pass --overwrite true or choose another folder"
        )
    if precision != "auto" and precision not in DTYPES:
        raise ConfigError(f"--precision {precision!r}: choose auto, {', '.join(DTYPES)}")
    dtype = None if precision == "auto" else DTYPES[precision]
    written = merge_adapter(checkpoint, Path(adapter), out_dir, dtype, parse_size(max_shard_size))
    print(f"Merged {adapter} into {checkpoint}: {written}")
