"""LoRA adapters in PEFT's on-disk format, so an adapter moves freely between litft, PEFT and tools built on it.

A PEFT LoRA adapter folder holds:
  - `adapter_config.json`: `peft_type` "LORA", `r`, `lora_alpha`, `lora_dropout`, `target_modules` (module-name
    suffixes, `"all-linear"`, or one regular expression matched against whole module names), `use_rslora`,
    `use_dora`, `task_type`, `base_model_name_or_path` and options litft does not support (those must be unset);
  - `adapter_model.safetensors`: `base_model.model.<module path>.lora_A.weight` (r, in), `.lora_B.weight`
    (out, r) and, for DoRA, `.lora_magnitude_vector` (out,).
litft's module paths are the Hugging Face ones, so the keys are litft's adapter names with the prefix added.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from litft.adapters.lora import (
    ALL_LINEAR,
    LoRAConfig,
    adapter_state_dict,
    apply_lora_to_modules,
    is_linear,
    lora_modules,
)
from litft.adapters.quantization import OUTPUT_HEAD_NAMES
from litft.checkpoint import AtomicDirectory
from litft.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# adapter_config.json fields for features litft does not implement, with the value that means "not used".
UNSUPPORTED_WHEN_SET: dict[str, Any] = {
    "bias": "none",
    "fan_in_fan_out": False,
    "lora_bias": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "use_qalora": False,
    "trainable_token_indices": None,
    "target_parameters": None,
    "layer_replication": None,
}


def save_peft_adapter(
    model: nn.Module, lora_config: LoRAConfig, out_dir: str | Path, base_model_name_or_path: str
) -> None:
    """Writes the model's adapter as a PEFT adapter folder (config and safetensors), atomically."""
    from safetensors.torch import save_file

    state = {PEFT_PREFIX + name: tensor.contiguous().cpu() for name, tensor in adapter_state_dict(model).items()}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora_config.rank,
        "lora_alpha": lora_config.alpha,
        "lora_dropout": lora_config.dropout,
        "target_modules": _peft_target_modules(model),
        "use_rslora": lora_config.rslora,
        "use_dora": lora_config.dora,
        "init_lora_weights": True,
        "inference_mode": True,
        **UNSUPPORTED_WHEN_SET,
    }
    with AtomicDirectory(out_dir) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def _peft_target_modules(model: nn.Module) -> list[str]:
    """Leaf module names (`q_proj`) when they pick out exactly the adapted modules, else the full module names."""
    adapted = set(lora_modules(model))
    leaves = {name.rpartition(".")[2] for name in adapted}
    candidates = {name for name, module in model.named_modules() if is_linear(module) or name in adapted}
    same_leaf = {name for name in candidates if name.rpartition(".")[2] in leaves}
    return sorted(leaves) if same_leaf == adapted else sorted(adapted)


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter's `adapter_config.json`, checked to describe a LoRA adapter litft can apply."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise CheckpointError(f"--adapter {folder}: no such folder")
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG}; expected a LoRA adapter folder from litft or PEFT")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else None
        raise CheckpointError(f"{path}: peft_type is {found!r}; litft loads LORA adapters only")
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise CheckpointError(f"{path}: field {key!r} is missing")
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        if not isinstance(config[key], kind) or isinstance(config[key], bool) or config[key] <= 0:
            raise CheckpointError(f"{path}: field {key!r} is {config[key]!r}; expected a positive number")
    for key, unset in UNSUPPORTED_WHEN_SET.items():
        value = config.get(key)
        if value is not None and value != unset and value not in ({}, []):
            raise CheckpointError(f"{path}: field {key!r} = {config[key]!r} is not supported by litft")
    return config


def _modules_for_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """The linear modules PEFT would adapt for `target_modules`, following PEFT's matching rules."""
    linear_names = [name for name, module in model.named_modules() if is_linear(module)]
    if target_modules == ALL_LINEAR:
        return [name for name in linear_names if name.rpartition(".")[2] not in OUTPUT_HEAD_NAMES]
    if isinstance(target_modules, str):
        return [name for name in linear_names if re.fullmatch(target_modules, name)]
    return [name for name in linear_names if any(name == t or name.endswith("." + t) for t in target_modules)]


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> LoRAConfig:
    """Applies LoRA to a loaded model as `adapter_dir/adapter_config.json` describes and loads the adapter weights.
    Returns the adapter's settings. Fails with one line if the adapter does not fit the model."""
    from safetensors import SafetensorError, safe_open

    folder = Path(adapter_dir)
    config = read_adapter_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        hint = (
            " (only a pickled .bin was found: convert it to safetensors)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS}{hint}")
    module_names = _modules_for_targets(model, config["target_modules"])
    if not module_names:
        raise CheckpointError(
            f"{folder / ADAPTER_CONFIG}: target_modules {config['target_modules']!r} match no linear layer of "
            f"{type(model).__name__}; was the adapter trained for a different base model?"
        )
    lora_config = LoRAConfig(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        targets=module_names,
        rslora=bool(config.get("use_rslora", False)),
        dora=bool(config.get("use_dora", False)),
    )
    lora_config.validate()
    apply_lora_to_modules(model, module_names, lora_config)
    expected = adapter_state_dict(model)
    loaded: set[str] = set()
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                name = key.removeprefix(PEFT_PREFIX)
                if name not in expected:
                    raise CheckpointError(
                        f"{weights}: tensor {key!r} has no place in {type(model).__name__}; was the adapter trained "
                        "for a different base model?"
                    )
                tensor = handle.get_tensor(key)
                target = expected[name]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise CheckpointError(
                        f"{weights}: {key!r} has shape {tuple(tensor.shape)}, the model needs {tuple(target.shape)}; "
                        "was the adapter trained for a different base model?"
                    )
                with torch.no_grad():
                    target.copy_(tensor)
                loaded.add(name)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights}: corrupt or unreadable safetensors file ({error})") from None
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(f"{weights}: adapter tensors missing: {', '.join(missing[:3])}")
    return lora_config
