"""Model families and the registry that picks one from a checkpoint's config.json `model_type`.

Every family's `...ForCausalLM` offers the same surface:
  - `from_hf(config_dict)` on its config class, and a constructor taking that config;
  - `hidden_states(input_ids, position_ids=None, document_ids=None, kv_cache=None)` -> (B, T, hidden);
  - `logits(hidden)` -> (B, T, vocab) (head plus any soft-capping); `forward(...)` = both;
  - `blocks` (the ModuleList of decoder layers: the unit of FSDP sharding and activation checkpointing),
    `embeddings`, `tie_weights()`, `make_kv_cache(batch_size, max_length, device, dtype)`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from litft.errors import CheckpointError

# model_type -> (module, config class, model class); modules import lazily so an unused family costs nothing.
FAMILIES: dict[str, tuple[str, str, str]] = {
    "llama": ("litft.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("litft.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("litft.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "qwen3": ("litft.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "mixtral": ("litft.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "qwen2_moe": ("litft.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "qwen3_moe": ("litft.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "gemma": ("litft.models.gemma", "GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("litft.models.gemma", "GemmaConfig", "GemmaForCausalLM"),
    "gemma3_text": ("litft.models.gemma", "GemmaConfig", "GemmaForCausalLM"),
    "phi3": ("litft.models.phi3", "Phi3Config", "LlamaForCausalLM"),
    "gpt_neox": ("litft.models.gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM"),
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_classes(hf_config: dict[str, Any], source: str = "config.json") -> tuple[type, type]:
    import importlib

    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported; litft supports {', '.join(supported_model_types())}"
        )
    module_name, config_name, model_name = FAMILIES[model_type]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, model_name)


def build_model(hf_config: dict[str, Any], source: str = "config.json") -> nn.Module:
    """Builds the family's model for this config, with parameters wherever the current default device puts them
    (use `torch.device("meta")` to allocate nothing until the checkpoint is loaded)."""
    config_class, model_class = family_classes(hf_config, source)
    try:
        config = config_class.from_hf(hf_config)
    except KeyError as missing:
        raise CheckpointError(f"{source}: field {missing} is missing for model_type {hf_config['model_type']!r}") from None
    try:
        return model_class(config)
    except (TypeError, ValueError) as error:  # a field of the wrong type or value ("hidden_size": "64")
        raise CheckpointError(f"{source}: cannot build a {hf_config['model_type']} model from it ({error}); check "
                              "its sizes and types") from None
