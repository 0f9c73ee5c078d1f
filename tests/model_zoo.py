"""Tiny random Hugging Face checkpoints, one per supported family and variant, for tests to parametrize over.

`FAMILY_BUILDERS[name](empty_folder)` saves a random transformers model of that variant (float32, safetensors,
vocab 512 with the stories260K tokenizer) into the folder and returns it. Each config switches on what makes its
variant different (sliding windows of 8 tokens, rope scaling, biases, tied heads, partial rotary, soft-capping),
small enough that building one takes well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from conftest import save_tiny_hf_model

SLIDING_WINDOW = 8  # tests run sequences longer than this

# Shared by every decoder below; each variant overrides or adds what it needs.
TINY: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    tie_word_embeddings=False,
)


def _builder(config_class: str, model_class: str, **overrides: Any) -> Callable[[Path], Path]:
    config = {**TINY, **overrides}
    if config_class == "GPTNeoXConfig":
        del config["num_key_value_heads"]  # no grouped-query attention
    return partial(save_tiny_hf_model, config_class_name=config_class, model_class_name=model_class, **config)


# Gemma 3's two rope bases: scaled global rope on full layers, plain 10k rope on sliding ones.
GEMMA3_ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}
# Phi-4-mini style longrope: 0.75 of head_dim 16 rotates (6 frequency pairs); past 32 tokens the long factors apply.
PHI4_ROPE = {
    "rope_type": "longrope", "rope_theta": 10_000.0, "partial_rotary_factor": 0.75,
    "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
}

FAMILY_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "llama": _builder("LlamaConfig", "LlamaForCausalLM"),
    "llama3.1-rope": _builder(
        "LlamaConfig", "LlamaForCausalLM", rope_parameters={
            "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
    ),
    "llama3.2-tied": _builder("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=True),
    "mistral-sliding": _builder("MistralConfig", "MistralForCausalLM", sliding_window=SLIDING_WINDOW),
    "qwen2": _builder("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": _builder("Qwen3Config", "Qwen3ForCausalLM", head_dim=24, tie_word_embeddings=True),
    "gemma": _builder("GemmaConfig", "GemmaForCausalLM", head_dim=16, num_key_value_heads=1, tie_word_embeddings=True),
    "gemma2": _builder(
        "Gemma2Config", "Gemma2ForCausalLM", head_dim=16, num_hidden_layers=3, query_pre_attn_scalar=24,
        sliding_window=SLIDING_WINDOW, attn_logit_softcapping=0.5, final_logit_softcapping=2.0,
        tie_word_embeddings=True,
    ),
    "gemma3": _builder(
        "Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16, num_hidden_layers=3, query_pre_attn_scalar=24,
        sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters=GEMMA3_ROPE, tie_word_embeddings=True,
    ),
    "phi3": _builder("Phi3Config", "Phi3ForCausalLM", sliding_window=SLIDING_WINDOW),
    "phi4mini-partial-rotary": _builder(
        "Phi3Config", "Phi3ForCausalLM", rope_parameters=PHI4_ROPE, original_max_position_embeddings=32,
        tie_word_embeddings=True,
    ),
    "gpt_neox": _builder(
        "GPTNeoXConfig", "GPTNeoXForCausalLM", rotary_pct=0.25, use_parallel_residual=True, hidden_act="gelu",
    ),
    # Mixtures of experts: 4 experts, 2 per token. Qwen2-MoE with its shared expert and a dense second layer
    # (mlp_only_layers), Qwen3-MoE with the chosen weights renormalised (norm_topk_prob) and q/k norms.
    "mixtral": _builder("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": _builder(
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, mlp_only_layers=[1],
    ),
    "qwen3_moe": _builder(
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, head_dim=24,
    ),
}

# Variants that only the model tests need: the sequential-residual GPT-NeoX.
EXTRA_BUILDERS: dict[str, Callable[[Path], Path]] = {
    "gpt_neox-sequential": _builder(
        "GPTNeoXConfig", "GPTNeoXForCausalLM", rotary_pct=0.5, use_parallel_residual=False, hidden_act="gelu_new",
    ),
}
