"""Parameter-efficient fine-tuning: LoRA / rsLoRA / DoRA layers (`lora`), bitsandbytes-quantized QLoRA bases
(`quantization`), PEFT-format adapter files (`peft_format`) and merging adapters into a checkpoint (`merge`)."""

from litft.adapters.lora import LoRAConfig, LoRALinear, adapter_state_dict, apply_lora, merge_lora_
from litft.adapters.peft_format import load_peft_adapter, save_peft_adapter
from litft.adapters.quantization import QUANTIZE_MODES, QuantizedLinear, quantize_model

__all__ = [
    "QUANTIZE_MODES",
    "LoRAConfig",
    "LoRALinear",
    "QuantizedLinear",
    "adapter_state_dict",
    "apply_lora",
    "load_peft_adapter",
    "merge_lora_",
    "quantize_model",
    "save_peft_adapter",
]
