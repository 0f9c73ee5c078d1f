"""The Llama family: Llama 2 / 3 / 3.1 / 3.2, SmolLM2, TinyLlama, Mistral, Qwen2 / 2.5 and Qwen3, and their
mixture-of-experts variants Mixtral, Qwen2-MoE (Qwen1.5-MoE) and Qwen3-MoE.

They share one architecture: pre-norm decoder blocks of RMSNorm, grouped-query attention with rotary positions
and a SwiGLU MLP. The differences are config flags, read from the checkpoint's config.json:
  - Mistral: `sliding_window` (every layer, where configured);
  - Qwen2: bias on the q, k, v projections (not on o);
  - Qwen3: RMSNorm over each head of q and k before the rotation (`qk_norm`);
  - Llama 3.1: the `llama3` rope scaling rule; Llama 3.2: tied input/output embeddings;
  - Phi-3 (litft.models.phi3): fused `qkv_proj` and `gate_up_proj` (`fused_projections`), partial rotary;
  - Mixtral, Qwen2-MoE, Qwen3-MoE: a sparse layer's MLP is `num_experts` SwiGLU experts, of which a router picks
    `experts_per_token` for each token (`SparseMoE`); Qwen2-MoE adds one sigmoid-gated expert every token takes.
Module and parameter names are Hugging Face's, so a checkpoint loads with no renaming. For the experts these are
the names checkpoints on the Hub store (one `experts.{e}` module per expert, Mixtral's `w1`/`w3`/`w2`), which is
also how transformers writes them, although it holds them stacked in memory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
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
    # Mixture of experts (0 experts: every layer's MLP is dense). Which layers are sparse: `sparse_layers`.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    normalize_expert_weights: bool = True  # the chosen experts' router probabilities rescaled to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: an expert every token takes, scaled by a sigmoid gate
    sparse_layers: list[bool] = field(default_factory=list)
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
        qwen = model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
        if qwen and not hf.get("use_sliding_window", False):
            sliding_window = None  # Qwen configs carry a window they do not use
        if not layer_types:
            if sliding_window is None:
                layer_types = ["full_attention"] * n_layer
            elif qwen:
                first = hf.get("max_window_layers", n_layer)
                layer_types = ["full_attention" if i < first else "sliding_attention" for i in range(n_layer)]
            else:
                layer_types = ["sliding_attention"] * n_layer
        if sliding_window is None or "sliding_attention" not in layer_types:
            sliding_window, layer_types = None, ["full_attention"] * n_layer
        experts = _experts_from_hf(hf, model_type, n_layer)
        # Qwen2 always has q/k/v biases, Qwen2-MoE unless its config says otherwise
        qkv_bias = attention_bias or model_type == "qwen2"
        qkv_bias = qkv_bias or (model_type == "qwen2_moe" and bool(hf.get("qkv_bias", True)))
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
            qkv_bias=qkv_bias,
            o_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            sliding_window=sliding_window,
            layer_types=list(layer_types),
            **experts,
            model_type=model_type,
            hf_config=hf,
        )

    @property
    def mlp_name(self) -> str:
        """The decoder layer's MLP module: Mixtral's checkpoints call its mixture of experts `block_sparse_moe`."""
        return "block_sparse_moe" if self.model_type == "mixtral" else "mlp"

    @property
    def expert_projection_names(self) -> tuple[str, str, str]:
        """An expert's gate, up and down projections, as its checkpoints name them."""
        return ("w1", "w3", "w2") if self.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def _experts_from_hf(hf: dict[str, Any], model_type: str, n_layer: int) -> dict[str, Any]:
    """The mixture-of-experts fields of LlamaConfig from a Mixtral / Qwen-MoE config.json; none for dense models."""
    if model_type not in ("mixtral", "qwen2_moe", "qwen3_moe"):
        return {}
    num_experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
    if model_type == "mixtral":  # every layer sparse; the experts are intermediate_size wide
        sparse_layers = [num_experts > 0] * n_layer
        expert_size, normalize = hf["intermediate_size"], True
    else:  # dense layers where listed in mlp_only_layers or off the decoder_sparse_step
        step, dense = hf.get("decoder_sparse_step", 1) or 1, set(hf.get("mlp_only_layers") or [])
        sparse_layers = [num_experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(n_layer)]
        expert_size, normalize = hf["moe_intermediate_size"], bool(hf.get("norm_topk_prob", False))
    top_k = hf["num_experts_per_tok"]
    if any(sparse_layers) and not 0 < top_k <= num_experts:
        raise CheckpointError(
            f"config.json: num_experts_per_tok {top_k} must be between 1 and num_experts ({num_experts})"
        )
    return dict(
        num_experts=num_experts,
        experts_per_token=top_k,
        expert_intermediate_size=expert_size,
        normalize_expert_weights=normalize,
        shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
        sparse_layers=sparse_layers,
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


class Router(nn.Module):
    """Scores each token against every expert and keeps the `top_k` best, with their softmax probabilities as the
    weights of their outputs. Deliberately not an nn.Linear: LoRA's `all-linear` and 4-bit quantization leave it
    as it is, since which experts a token reaches should not drift with an adapter or with rounding."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k = top_k
        self.normalize = normalize
        # While a load-balancing loss is gathered (`litft.training.loss.router_choices`): each call appends its
        # probabilities and choices here.
        self.collected: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)  # (N, num_experts)
        probabilities = logits.float().softmax(dim=-1)
        weights, experts = probabilities.topk(self.top_k, dim=-1)  # (N, top_k) each
        if self.collected is not None:
            self.collected.append((probabilities, experts))
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts  # weights in float32


class SharedExpertGate(nn.Module):
    """Qwen2-MoE: how much of the shared expert each token takes, sigmoid(x . weight). Like the router, not an
    nn.Linear, so neither adapted nor quantized."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.linear(x, self.weight))  # (N, 1)


class Expert(nn.Module):
    """One SwiGLU expert, its three projections under the names its checkpoints use."""

    def __init__(self, hidden_size: int, intermediate_size: int, names: tuple[str, str, str]) -> None:
        super().__init__()
        self.names = names
        gate, up, down = names
        self.add_module(gate, nn.Linear(hidden_size, intermediate_size, bias=False))
        self.add_module(up, nn.Linear(hidden_size, intermediate_size, bias=False))
        self.add_module(down, nn.Linear(intermediate_size, hidden_size, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return gated_mlp(x, gate, up, down, "silu")


def experts_together(
    experts: nn.ModuleList, rows: torch.Tensor, ends: torch.Tensor, row_weights: torch.Tensor
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Each expert's output for its run of `rows` (sorted by expert: expert e's rows end at `ends[e]`, a device
    tensor of cumulative counts), times that row's router weight (`row_weights`, in the rows' dtype). LoRA experts
    can compute together in grouped GEMMs that read the run ends on the device (`litft.adapters.lora_experts`,
    which weights the down projection's input, a third as wide as its output, and under --compile returns the
    output as two summands); otherwise each expert runs on its rows, which reads the counts on the host."""
    first = getattr(experts[0], experts[0].names[0])
    # LoRA experts through their class; plain ones laid back to back carry the function themselves.
    together = getattr(type(first), "experts_together", None) or experts.__dict__.get("experts_together")
    outputs = together(experts, rows, ends, row_weights) if together is not None else None
    experts.__dict__["counts_read_on_host"] = outputs is None  # `LlamaForCausalLM.decode_graph_safe`
    if outputs is not None:
        return outputs
    counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    # Without gradients (generation, evaluation) an expert no row chose is skipped: decoding a token then runs its
    # top_k experts, not all of them. In training every expert runs, so that all take part in the backward.
    return torch.cat([
        expert(part) if part.shape[0] or torch.is_grad_enabled() else part
        for expert, part in zip(experts, rows.split(counts))
    ]) * row_weights[:, None]


class _RowsByExpert(torch.autograd.Function):
    """x (N, C) -> its rows in expert order (N * top_k, C): row i is token order[i] // top_k. The backward sums
    each token's top_k row gradients through a gather (`inverse`: where each (token, slot) pair went), not with
    scattered atomic adds after a sort of the indices, as indexing's backward would."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x.index_select(0, order // top_k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        (inverse,) = ctx.saved_tensors
        by_token = grad.index_select(0, inverse).view(-1, ctx.top_k, grad.shape[-1])  # (N, top_k, C)
        return by_token.sum(dim=1, dtype=torch.float32).to(grad.dtype), None, None, None


class _TokenOrder(torch.autograd.Function):
    """The experts' outputs (N * top_k, C), in expert order, back in (token, slot) order: a permutation, whose
    backward is the inverse permutation, again a gather."""

    @staticmethod
    def forward(ctx, outputs: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order)
        return outputs.index_select(0, inverse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order), None, None


def gather_sum(down: torch.Tensor, update: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
    """y (N, C) = for each token, the sum over its top_k rows (at `inverse`) of down + update, in float32, rounded
    once to the rows' dtype. Compiled, one kernel reads each summand once through the gather and writes y."""
    rows = down.index_select(0, inverse) + update.index_select(0, inverse)  # (N * top_k, C) in token order
    return rows.view(-1, top_k, rows.shape[-1]).sum(dim=1, dtype=torch.float32).to(down.dtype)


@functools.cache
def _compiled_gather_sum():
    return torch.compile(gather_sum, dynamic=True)


class _CombineSlots(torch.autograd.Function):
    """Each token's weighted expert outputs summed, the experts' two summands (base and adapter) added on the way,
    through the compiled `gather_sum`; the backward hands both summands, for each row, its token's gradient (a
    gather by `order // top_k`)."""

    @staticmethod
    def forward(ctx, down: torch.Tensor, update: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor,
                top_k: int) -> torch.Tensor:
        ctx.save_for_backward(order)
        ctx.top_k = top_k
        return _compiled_gather_sum()(down, update, inverse, top_k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        (order,) = ctx.saved_tensors
        rows = grad.index_select(0, order // ctx.top_k)  # (N * top_k, C)
        return rows, rows, None, None, None


class SparseMoE(nn.Module):
    """A mixture of experts: each token goes through the `experts_per_token` experts its router picks, and their
    outputs are summed with the router's weights (Qwen2-MoE adds a shared expert every token takes).

    The tokens are sorted by expert, so each expert runs once on one contiguous run of its tokens. Every expert
    runs, on no tokens where none chose it, so each one's parameters take part in every backward (DDP needs that)
    and its gradient is zero. Where the experts compute in grouped GEMMs the run boundaries stay on the device, so
    the host never waits for the GPU here and a decoding step can be recorded in a CUDA graph; the experts one by
    one read them on the host (`LlamaForCausalLM.decode_graph_safe`). The routing runs outside torch.compile; under
    --compile the experts' elementwise work and the sum over each token's rows run as compiled functions of their
    own."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        names = config.expert_projection_names
        self.gate = Router(
            config.hidden_size, config.num_experts, config.experts_per_token, config.normalize_expert_weights
        )
        self.experts = nn.ModuleList(
            Expert(config.hidden_size, config.expert_intermediate_size, names) for _ in range(config.num_experts)
        )
        if config.shared_expert_intermediate_size:
            shared_names = ("gate_proj", "up_proj", "down_proj")
            self.shared_expert = Expert(config.hidden_size, config.shared_expert_intermediate_size, shared_names)
            self.shared_expert_gate = SharedExpertGate(config.hidden_size)

    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C)
        weights, chosen = self.gate(x)  # (N, top_k) each
        top_k = chosen.shape[1]
        chosen = chosen.flatten()  # (N * top_k,): the (token, slot) pairs' experts
        order = chosen.argsort(stable=True)  # the pairs grouped by expert
        positions = torch.arange(order.shape[0], device=order.device)
        inverse = torch.empty_like(order).index_copy_(0, order, positions)  # where each pair went (no second sort)
        # Where each expert's run of rows ends, found on the device (a count read on the host would wait for the GPU).
        expert_ids = torch.arange(1, len(self.experts) + 1, device=chosen.device, dtype=chosen.dtype)
        ends = torch.searchsorted(chosen[order], expert_ids, out_int32=True)  # (num_experts,)
        row_weights = weights.flatten()[order].to(x.dtype)
        rows = _RowsByExpert.apply(x, order, inverse, top_k)  # (N * top_k, C)
        outputs = experts_together(self.experts, rows, ends, row_weights)  # (N * top_k, C), or its two summands
        # Back in token order, each token's top_k weighted outputs summed in float32: a gather and a sum rather
        # than scattered atomic adds, so the result does not depend on the order the GPU adds in.
        if isinstance(outputs, tuple):  # under --compile: added, gathered and summed in one compiled kernel
            y = _CombineSlots.apply(*outputs, order, inverse, top_k)
        else:
            by_token = _TokenOrder.apply(outputs, order, inverse).view(B * T, top_k, C)
            y = by_token.sum(dim=1, dtype=torch.float32).to(x.dtype)
        if hasattr(self, "shared_expert"):
            y = y + self.shared_expert_gate(x) * self.shared_expert(x)
        return y.reshape(B, T, C)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        sparse = bool(config.sparse_layers) and config.sparse_layers[layer_idx]
        self.mlp_name = config.mlp_name if sparse else "mlp"
        self.add_module(self.mlp_name, SparseMoE(config) if sparse else LlamaMLP(config))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: AttentionContext
    ) -> torch.Tensor:
        x = self.attend(x, cos, sin, context)
        return x + getattr(self, self.mlp_name)(self.post_attention_layernorm(x))

    def attend(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, context: AttentionContext
    ) -> torch.Tensor:
        """The block's first half, x + attention(norm(x)): compiled on its own where the second half is a mixture
        of experts, which stays eager (`litft.training.compilation.compile_blocks`)."""
        return x + self.self_attn(self.input_layernorm(x), cos, sin, context)


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

    @property
    def decode_graph_safe(self) -> bool:
        """Whether the last forward pass read nothing on the host, so that a CUDA graph can record the decoding step
        (`litft.generation.DecodeStep` asks after an uncaptured first step): true unless a mixture ran its experts
        one by one, which reads their token counts on the host."""
        return not any(
            isinstance(module, SparseMoE) and module.experts.__dict__.get("counts_read_on_host")
            for module in (getattr(layer, layer.mlp_name) for layer in self.model.layers)
        )

    def decode(self, x: torch.Tensor, position_ids: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        cos, sin = self.model.rotary_emb(position_ids)  # (B, T, rotary_dim) float32
        for layer in self.model.layers:
            x = layer(x, cos, sin, context)
        return self.model.norm(x)
