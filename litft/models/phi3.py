"""Phi-3, Phi-3.5-mini and Phi-4-mini (model_type "phi3").

Architecturally Phi-3 is Llama (litft.models.llama) with three differences, all read from config.json:
  - the checkpoint stores q, k, v as one `qkv_proj` (rows [q | k | v]) and gate, up as one `gate_up_proj`
    (rows [gate | up]); they stay fused under those names so PEFT adapters targeting `qkv_proj` apply as-is;
  - only the first `partial_rotary_factor` of each head rotates (Phi-4-mini: 0.75);
  - `longrope` scaling with short and long factors (litft.models.common.RotaryEmbedding), and the pretraining
    context in the top-level `original_max_position_embeddings`.
So the model class is LlamaForCausalLM; this file only maps the config.
"""

from __future__ import annotations

from typing import Any

from litft.models.llama import LlamaConfig, LlamaForCausalLM

__all__ = ["LlamaForCausalLM", "Phi3Config"]


class Phi3Config(LlamaConfig):
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> Phi3Config:
        config = super().from_hf(hf)  # partial rotary and longrope are read by RopeConfig.from_hf
        config.fused_projections = True
        return config
