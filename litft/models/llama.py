"""The Llama family: Llama 2 / 3 / 3.1 / 3.2, SmolLM2, TinyLlama, Mistral, Qwen2 / 2.5 and Qwen3.

They share one architecture: pre-norm decoder blocks of RMSNorm, grouped-query attention with rotary positions
and a SwiGLU MLP. The differences are config flags, read from the checkpoint's config.json:
  - Mistral: `sliding_window` (every layer, where configured);
  - Qwen2: bias on the q, k, v projections (not on o);
  - Qwen3: RMSNorm over each head of q and k before the rotation (`qk_norm`);
  - Llama 3.1: the `llama3` rope scaling rule; Llama 3.2: tied input/output embeddings;
  - Phi-3 (litft.models.phi3): fused `qkv_proj` and `gate_up_proj` (`fused_projections`), partial rotary.
Module and parameter names are Hugging Face's, so a checkpoint loads with no renaming.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from litft.errors import CheckpointError
from litft.models.common import (
    AttentionContext,
    CausalLM,
    RMSNorm,
    RopeConfig,
    RotaryEmbedding,
    attend,
    gated_down,
    gated_mlp,
)
from litft.models.rotary_heads import attention_heads


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q, k, v (Qwen2, Llama with attention_bias)
    o_bias: bool = False  # bias on o (Llama with attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    fused_projections: bool = False  # Phi-3: q, k, v stored as one `qkv_proj`, gate and up as one `gate_up_proj`
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention" per layer
    model_type: str = "llama"
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        model_type = hf["model_type"]
        # The MLP is SwiGLU: an other activation would run as SiLU and give wrong logits without a word.
        activation = hf.get("hidden_act", "silu")
        if activation not in ("silu", "swish"):
            raise CheckpointError(f"config.json: hidden_act {activation!r} is not supported for {model_type} (silu)")
        n_head = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
        attention_bias = bool(hf.get("attention_bias", False))
        sliding_window = hf.get("sliding_window")
        n_layer = hf["num_hidden_layers"]
        layer_types = hf.get("layer_types")
        if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            sliding_window = None  # Qwen configs carry a window they do not use
        if not layer_types:
            if sliding_window is None:
                layer_types = ["full_attention"] * n_layer
            elif model_type in ("qwen2", "qwen3"):
                first = hf.get("max_window_layers", n_layer)
                layer_types = ["full_attention" if i < first else "sliding_attention" for i in range(n_layer)]
            else:
                layer_types = ["sliding_attention"] * n_layer
        if sliding_window is None or "sliding_attention" not in layer_types:
            sliding_window, layer_types = None, ["full_attention"] * n_layer
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=hf.get("num_key_value_heads") or n_head,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=RopeConfig.from_hf(hf, head_dim),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            layer_types=list(layer_types),
            model_type=model_type,
            hf_config=hf,
        )


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.num_attention_heads
        self.n_kv_head = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.qkv_sizes = [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim]
        if config.fused_projections:
            self.qkv_proj = nn.Linear(config.hidden_size, sum(self.qkv_sizes), bias=config.qkv_bias)
        else:
            self.q_proj = nn.Linear(config.hidden_size, self.qkv_sizes[0], bias=config.qkv_bias)
            self.k_proj = nn.Linear(config.hidden_size, self.qkv_sizes[1], bias=config.qkv_bias)
            self.v_proj = nn.Linear(config.hidden_size, self.qkv_sizes[2], bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: AttentionContext
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = attention_heads(x, self, cos, sin)  # (B, n_head, T, head_dim), (B, n_kv_head, T, head_dim) x 2
        if context.kv_cache is not None:
            k, v = context.kv_cache.update(self.layer_idx, k, v)  # (B, n_kv_head, S, head_dim)
        y = attend(q, k, v, context, sliding=self.sliding)  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        if config.fused_projections:
            self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        else:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
            self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "gate_up_proj"):
            return gated_mlp(x, self.gate_proj, self.up_proj, self.down_proj, "silu")  # down(act(gate) * up)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, intermediate_size) each
        return gated_down(gate, up, self.down_proj, "silu")


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: AttentionContext
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, context)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope)


class LlamaForCausalLM(CausalLM):
    """The model with its language-model head. `forward` returns logits (B, T, vocab); training calls
    `hidden_states` and applies the head chunk by chunk inside the loss (see litft.training.loss)."""

    embeddings_name, blocks_name, head_name = "model.embed_tokens", "model.layers", "lm_head"

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def decode(self, x: torch.Tensor, position_ids: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        cos, sin = self.model.rotary_emb(position_ids)  # (B, T, rotary_dim) float32
        for layer in self.model.layers:
            x = layer(x, cos, sin, context)
        return self.model.norm(x)
