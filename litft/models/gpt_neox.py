"""GPT-NeoX and Pythia (model_type "gpt_neox").

An older decoder than Llama's:
  - LayerNorm with bias (not RMSNorm), and biases on every projection (`attention_bias`, default true);
  - one fused `query_key_value` projection laid out per head: its output is (n_head, 3, head_dim) flattened, so
    each head's q, k and v sit next to each other (unlike Phi-3's [all q | all k | all v]);
  - only the first `rotary_pct` of each head's dims rotate (Pythia: 0.25), with base `rotary_emb_base`;
  - a plain GELU MLP (`dense_h_to_4h`, `dense_4h_to_h`);
  - `use_parallel_residual` (Pythia: true): attention and MLP both read the block input, x + attn(ln1(x)) +
    mlp(ln2(x)); otherwise they run one after the other as in Llama;
  - untied output head `embed_out` beside the `gpt_neox` trunk.
Module and parameter names are Hugging Face's, so a checkpoint loads with no renaming.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from litft.errors import CheckpointError
from litft.models.common import (
    AttentionContext,
    CausalLM,
    RopeConfig,
    RotaryEmbedding,
    apply_rotary,
    attend,
)

# hidden_act -> F.gelu's `approximate` argument.
GELU_APPROXIMATIONS = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh"}


@dataclass
class GPTNeoXConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    layer_norm_eps: float
    rope: RopeConfig
    gelu_approximation: str = "none"
    attention_bias: bool = True
    use_parallel_residual: bool = True
    tie_word_embeddings: bool = False

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads  # no grouped-query attention

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GPTNeoXConfig:
        n_head = hf["num_attention_heads"]
        head_dim = hf["hidden_size"] // n_head
        activation = hf.get("hidden_act", "gelu")
        if activation not in GELU_APPROXIMATIONS:
            raise CheckpointError(f"config.json: hidden_act {activation!r} is not supported for GPT-NeoX")
        # Configs older than transformers 5 name the rotary settings `rotary_emb_base` and `rotary_pct`.
        rope_hf = {**hf, "rope_theta": hf.get("rope_theta") or hf.get("rotary_emb_base") or 10000.0}
        rope = RopeConfig.from_hf(rope_hf, head_dim, partial_rotary_factor=hf.get("rotary_pct", 0.25))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf.get("intermediate_size") or 4 * hf["hidden_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=n_head,
            head_dim=head_dim,
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
            rope=rope,
            gelu_approximation=GELU_APPROXIMATIONS[activation],
            attention_bias=bool(hf.get("attention_bias", True)),
            use_parallel_residual=bool(hf.get("use_parallel_residual", True)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: GPTNeoXConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.query_key_value(x).view(B, T, self.n_head, 3 * self.head_dim)  # per head: [q | k | v]
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)  # (B, n_head, T, head_dim) each
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if context.kv_cache is not None:
            k, v = context.kv_cache.update(self.layer_idx, k, v)  # (B, n_head, S, head_dim)
        y = attend(q, k, v, context)  # (B, n_head, T, head_dim)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.approximate = config.gelu_approximation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: GPTNeoXConfig, layer_idx: int) -> None:
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, layer_idx)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(x), cos, sin, context)
        if self.use_parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoXModel(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope)


class GPTNeoXForCausalLM(CausalLM):
    """The `gpt_neox` trunk with its output head `embed_out`."""

    embeddings_name, blocks_name, head_name = "gpt_neox.embed_in", "gpt_neox.layers", "embed_out"

    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def decode(self, x: torch.Tensor, position_ids: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        cos, sin = self.gpt_neox.rotary_emb(position_ids)  # (B, T, rotary_dim) float32
        for layer in self.gpt_neox.layers:
            x = layer(x, cos, sin, context)
        return self.gpt_neox.final_layer_norm(x)
