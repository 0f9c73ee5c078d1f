"""The Gemma family: Gemma (v1), Gemma 2 and the Gemma 3 text models (model_type "gemma", "gemma2", "gemma3_text").

Like Llama, a stack of pre-norm decoder blocks with grouped-query rotary attention and a gated MLP, but:
  - the token embeddings are multiplied by sqrt(hidden_size), rounded to the model dtype first;
  - every RMSNorm scales by (1 + weight) (checkpoints store weight - 1);
  - the MLP gate is tanh-approximated GELU, not SiLU;
  - attention scores are scaled by query_pre_attn_scalar ** -0.5 (Gemma 2 / 3), not head_dim ** -0.5;
  - Gemma 2 / 3 norm both sides of attention and of the MLP ("sandwich" norms), and some layers attend within a
    sliding window: Gemma 2 alternates (sliding first), Gemma 3 follows `layer_types`, and its sliding layers use
    their own rope base (`rope_local_base_freq`, 10k) while full layers keep theta 1M and any rope scaling;
  - Gemma 2 soft-caps attention scores (tanh(s / cap) * cap); Gemma 2 (and Gemma 3 if configured) soft-caps logits;
  - Gemma 3 RMS-normalises each head of q and k before the rotation.
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
    gated_mlp,
)
from litft.models.rotary_heads import attention_heads

# transformers maps Gemma's legacy "gelu" to the tanh approximation its weights were trained with.
TANH_GELU_NAMES = ("gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast")


@dataclass
class GemmaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig  # full-attention layers
    local_rope: RopeConfig | None = None  # Gemma 3's sliding layers, with their own base frequency
    query_pre_attn_scalar: float | None = None  # attention scale is its inverse square root; None: head_dim
    attention_bias: bool = False
    sandwich_norms: bool = False  # Gemma 2 / 3: norms after attention and after the MLP as well
    qk_norm: bool = False  # Gemma 3
    attn_logit_softcapping: float | None = None  # Gemma 2
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention" per layer
    tie_word_embeddings: bool = True
    model_type: str = "gemma2"

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GemmaConfig:
        model_type = hf["model_type"]
        n_layer = hf["num_hidden_layers"]
        n_head = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
        activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if activation not in TANH_GELU_NAMES:
            raise CheckpointError(f"config.json: hidden_activation {activation!r} is not supported for Gemma")
        sliding_window = hf.get("sliding_window") if model_type != "gemma" else None
        layer_types = hf.get("layer_types")
        if not layer_types:
            # Hub configs older than `layer_types`: Gemma 2 alternates from a sliding layer; Gemma 3 makes every
            # `sliding_window_pattern`-th layer full (default 6); Gemma v1 has no window.
            pattern = {"gemma": 0, "gemma2": 2}.get(model_type, hf.get("sliding_window_pattern") or 6)
            layer_types = [
                "sliding_attention" if pattern and (i + 1) % pattern else "full_attention" for i in range(n_layer)
            ]
        if sliding_window is None or "sliding_attention" not in layer_types:
            sliding_window, layer_types = None, ["full_attention"] * n_layer
        rope, local_rope = gemma_ropes(hf, head_dim)
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=hf.get("num_key_value_heads") or n_head,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=rope,
            local_rope=local_rope if model_type == "gemma3_text" else None,
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar") or 256 if model_type != "gemma" else None,
            attention_bias=bool(hf.get("attention_bias", False)),
            sandwich_norms=model_type != "gemma",
            qk_norm=model_type == "gemma3_text",
            # Gemma 3 configs carry an attention softcap that its attention never applies (transformers agrees).
            attn_logit_softcapping=hf.get("attn_logit_softcapping") if model_type == "gemma2" else None,
            final_logit_softcapping=hf.get("final_logit_softcapping"),
            sliding_window=sliding_window,
            layer_types=list(layer_types),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            model_type=model_type,
        )


def gemma_ropes(hf: dict[str, Any], head_dim: int) -> tuple[RopeConfig, RopeConfig]:
    """The rotary settings of full and sliding layers. Gemma 3 configs written by transformers >= 5 nest them by
    layer type under `rope_parameters`; older ones have `rope_theta` (+ `rope_scaling`) and `rope_local_base_freq`."""
    nested = hf.get("rope_parameters") or {}
    if "full_attention" in nested or "sliding_attention" in nested:
        full = {**hf, "rope_parameters": nested.get("full_attention") or {}, "rope_scaling": None}
        local = {**hf, "rope_parameters": nested.get("sliding_attention") or {}, "rope_scaling": None}
        full.setdefault("rope_theta", 1_000_000.0)
    else:
        full = hf
        local = {**hf, "rope_parameters": None, "rope_scaling": None, "rope_theta": hf.get("rope_local_base_freq")}
    return RopeConfig.from_hf(full, head_dim), RopeConfig.from_hf(local, head_dim)


class GemmaAttention(nn.Module):
    def __init__(self, config: GemmaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.num_attention_heads
        self.n_kv_head = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.softcap = config.attn_logit_softcapping
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.hidden_size, bias=bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=True)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, unit_offset=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = attention_heads(x, self, cos, sin)  # (B, n_head, T, head_dim), (B, n_kv_head, T, head_dim) x 2
        if context.kv_cache is not None:
            k, v = context.kv_cache.update(self.layer_idx, k, v)  # (B, n_kv_head, S, head_dim)
        y = attend(q, k, v, context, sliding=self.sliding, scale=self.scale, softcap=self.softcap)  # (B, n_head, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


class GemmaMLP(nn.Module):
    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_mlp(x, self.gate_proj, self.up_proj, self.down_proj, "gelu_tanh")  # down(act(gate) * up)


class GemmaDecoderLayer(nn.Module):
    """Gemma v1: x + attn(norm(x)), then x + mlp(post_attention_layernorm(x)), as in Llama.
    Gemma 2 / 3: `post_attention_layernorm` norms the attention *output*, and the MLP gets its own pair."""

    def __init__(self, config: GemmaConfig, layer_idx: int) -> None:
        super().__init__()
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.sliding = config.layer_types[layer_idx] == "sliding_attention"
        self.input_layernorm = RMSNorm(dim, eps, unit_offset=True)
        self.self_attn = GemmaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(dim, eps, unit_offset=True)
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(dim, eps, unit_offset=True)
            self.post_feedforward_layernorm = RMSNorm(dim, eps, unit_offset=True)
        self.mlp = GemmaMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        if not hasattr(self, "pre_feedforward_layernorm"):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, context)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, context))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=True)
        self.rotary_emb = RotaryEmbedding(config.rope)
        if config.local_rope is not None:
            self.rotary_emb_local = RotaryEmbedding(config.local_rope)


class GemmaForCausalLM(CausalLM):
    """The model with its language-model head (tied to the embeddings in every released Gemma)."""

    embeddings_name, blocks_name, head_name = "model.embed_tokens", "model.layers", "lm_head"

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = GemmaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # (B, T, hidden_size)
        # The scale is rounded to the model dtype first, as in Gemma's training (sqrt(2048) in bf16 is 45.25).
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)

    def decode(self, x: torch.Tensor, position_ids: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        rope = self.model.rotary_emb(position_ids)  # (cos, sin), each (B, T, rotary_dim) float32
        local_rope = self.model.rotary_emb_local(position_ids) if hasattr(self.model, "rotary_emb_local") else rope
        for layer in self.model.layers:
            x = layer(x, *(local_rope if layer.sliding else rope), context)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)  # (B, T, vocab_size)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
