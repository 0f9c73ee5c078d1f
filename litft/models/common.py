"""The few blocks whose math is identical across families: RMSNorm, rotary tables, the attention masks, the KV
cache and the attention call itself. Everything family-specific lives in that family's file."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from litft.errors import CheckpointError
from litft.models import flash_attention


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back.

    `unit_offset=True` scales by (1 + weight), Gemma's convention (its checkpoints store weight - 1)."""

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) if not unit_offset else torch.zeros(dim))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            # Gemma scales in float32, then casts; Llama casts, then scales. Each order is kept to match its family.
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def project(x: torch.Tensor, *layers: nn.Module) -> tuple[torch.Tensor, ...]:
    """The outputs of linear layers that all read `x` (q, k, v; gate, up). Layers that can compute together do
    (LoRA layers share one read of x and one input gradient: `litft.adapters.lora_projections`); others are called
    one by one. The layers keep their own modules and parameter names either way."""
    joiner = next((type(layer) for layer in layers if hasattr(type(layer), "forward_together")), None)
    outputs = joiner.forward_together(x, layers) if joiner is not None else None
    return tuple(outputs) if outputs is not None else tuple(layer(x) for layer in layers)


def project_joined(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor | None:
    """The outputs of `layers` that all read `x` side by side in one tensor (..., sum of their out_features), where
    they compute as one GEMM (LoRA's q, k, v with their frozen weights joined); None where they do not (then
    `project`)."""
    joiner = next((type(layer) for layer in layers if hasattr(type(layer), "forward_joined")), None)
    return joiner.forward_joined(x, layers) if joiner is not None else None


def gated_mlp(x: torch.Tensor, gate: nn.Module, up: nn.Module, down: nn.Module, activation: str) -> torch.Tensor:
    """A gated MLP, down(act(gate(x)) * up(x)), `activation` "silu" (Llama) or "gelu_tanh" (Gemma). LoRA layers
    compute it in two operators, the product formed with gate and up in their GEMM's kernel where it runs
    (`litft.adapters.lora_gated_down.gated_mlp`); other layers as `project` and `gated_down` compute it."""
    fused = getattr(type(down), "gated_mlp", None)
    output = fused(x, gate, up, down, activation) if fused is not None else None
    if output is not None:
        return output
    return gated_down(*project(x, gate, up), down, activation)


def gated_down(gate: torch.Tensor, up: torch.Tensor, down: nn.Module, activation: str) -> torch.Tensor:
    """A gated MLP's last projection, down(act(gate) * up), `activation` "silu" (Llama) or "gelu_tanh" (Gemma). A
    LoRA down projection computes it in one operator whose backward never writes act(gate) * up to memory
    (`litft.adapters.lora_gated_down`); other layers take the product as written."""
    fused = getattr(type(down), "gated_down", None)
    output = fused(gate, up, down, activation) if fused is not None else None
    if output is not None:
        return output
    if activation == "gelu_tanh":
        return down(F.gelu(gate, approximate="tanh") * up)
    return down(F.silu(gate) * up)


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RopeConfig:
    """Rotary settings read from a Hugging Face config: base frequency, how many of each head's dims rotate, and
    the long-context scaling rule (`rope_type`: default, linear, llama3, yarn, longrope) with its parameters."""

    theta: float = 10000.0
    rotary_dim: int = 0
    rope_type: str = "default"
    params: dict[str, Any] | None = None
    max_position_embeddings: int = 2048

    @classmethod
    def from_hf(cls, hf: dict[str, Any], head_dim: int, partial_rotary_factor: float = 1.0) -> RopeConfig:
        # transformers >= 5 writes `rope_parameters`; older configs have `rope_theta` and `rope_scaling`.
        params = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or {}
        params = {**scaling, **params}
        theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        params.pop("type", None)
        factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", partial_rotary_factor))
        rotary_dim = int(head_dim * factor)
        if hf.get("original_max_position_embeddings") and rope_type in ("llama3", "yarn", "longrope"):
            # Phi-3 keeps the pretraining length beside the rope settings; transformers gives that copy priority.
            params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        rope = cls(
            theta=float(theta),
            rotary_dim=rotary_dim,
            rope_type=rope_type,
            params=params,
            max_position_embeddings=int(hf.get("max_position_embeddings") or 2048),
        )
        rope.check()
        return rope

    def check(self) -> None:
        """Refuses, as the config is read (before any weight loads), a rope type that litft does not compute or one
        that lacks a parameter of its rule: computing the frequencies once, on the CPU, tells both."""
        try:
            rope_inverse_frequencies(self)
            if self.rope_type == "longrope":
                rope_inverse_frequencies(self, long_context=True)
        except KeyError as error:
            raise CheckpointError(f"config.json: rope type {self.rope_type!r} needs {error.args[0]!r} in its "
                                  "rope_scaling (or rope_parameters)") from None
        except (TypeError, ValueError, ZeroDivisionError) as error:
            raise CheckpointError(f"config.json: rope settings {self.params} of type {self.rope_type!r} cannot be "
                                  f"used: {error}") from None


def rope_inverse_frequencies(
    rope: RopeConfig, device: torch.device | None = None, long_context: bool = False
) -> tuple[torch.Tensor, float]:
    """The per-pair rotation frequencies (float32) and the attention scaling factor of the chosen rope type
    (`long_context` matters only to longrope: sequences longer than the original pretraining context)."""
    dim = rope.rotary_dim
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    params = rope.params or {}
    attention_factor = 1.0
    if rope.rope_type == "default":
        pass
    elif rope.rope_type == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif rope.rope_type == "llama3":
        factor = float(params["factor"])
        low_freq_factor = float(params["low_freq_factor"])
        high_freq_factor = float(params["high_freq_factor"])
        old_context = float(params["original_max_position_embeddings"])
        low_freq_wavelen = old_context / low_freq_factor
        high_freq_wavelen = old_context / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = torch.where(is_medium, blended, scaled)
    elif rope.rope_type == "yarn":
        factor = float(params["factor"])
        original = float(params.get("original_max_position_embeddings") or rope.max_position_embeddings)
        beta_fast = float(params.get("beta_fast") or 32)
        beta_slow = float(params.get("beta_slow") or 1)
        mscale = params.get("mscale")
        mscale_all_dim = params.get("mscale_all_dim")

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if params.get("attention_factor") is not None:
            attention_factor = float(params["attention_factor"])
        elif mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

        def correction_dim(num_rotations: float) -> float:
            return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

        low = correction_dim(beta_fast)
        high = correction_dim(beta_slow)
        if params.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = (torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)
        extrapolation_weight = 1 - ramp.clamp(0, 1)
        interpolation = inv_freq / factor
        inv_freq = interpolation * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    elif rope.rope_type == "longrope":
        # Phi-3.5 / Phi-4-mini: per-frequency rescaling. `long_context` picks the factors for sequences beyond the
        # original context; RotaryEmbedding computes both tables and chooses per forward pass, as transformers does.
        original = float(params.get("original_max_position_embeddings") or rope.max_position_embeddings)
        factors = params["long_factor" if long_context else "short_factor"]
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32, device=device)
        factor = float(params.get("factor") or rope.max_position_embeddings / original)
        if params.get("attention_factor") is not None:
            attention_factor = float(params["attention_factor"])
        elif factor > 1.0:
            attention_factor = math.sqrt(1 + math.log(factor) / math.log(original))
    else:
        raise CheckpointError(f"config.json: rope type {rope.rope_type!r} is not supported by litft yet")
    return inv_freq.float(), attention_factor


class RotaryEmbedding(nn.Module):
    """Turns position ids into (cos, sin) tables, always in float32.

    The frequencies are neither a parameter nor a buffer: `model.to(torch.bfloat16)` casts buffers, and bf16
    frequencies misplace every position past a few hundred. They are computed once per device instead."""

    def __init__(self, rope: RopeConfig) -> None:
        super().__init__()
        self.rope = rope
        self._tables: dict[torch.device, tuple[torch.Tensor, float]] = {}
        self._long_tables: dict[torch.device, tuple[torch.Tensor, float]] = {}

    def frequencies(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        device = position_ids.device
        if device not in self._tables:
            self._tables[device] = rope_inverse_frequencies(self.rope, device)
        if self.rope.rope_type != "longrope":
            return self._tables[device]
        # Longrope switches to its long factors once this pass reaches past the original context (the whole pass
        # uses one table, like transformers). torch.where keeps the choice on the device: no host sync.
        if device not in self._long_tables:
            self._long_tables[device] = rope_inverse_frequencies(self.rope, device, long_context=True)
        (short, attention_factor), (long, _) = self._tables[device], self._long_tables[device]
        original = (self.rope.params or {}).get("original_max_position_embeddings") or self.rope.max_position_embeddings
        return torch.where(position_ids.max() + 1 > original, long, short), attention_factor

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, attention_factor = self.frequencies(position_ids)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq  # (B, T, rotary_dim / 2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rotary_dim)
            return emb.cos() * attention_factor, emb.sin() * attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first `cos.shape[-1]` dims of each head of x (B, n_head, T, head_dim); the rest pass through
    (partial rotary, as in GPT-NeoX and Phi-4-mini)."""
    cos = cos.unsqueeze(1).to(x.dtype)  # (B, 1, T, rotary_dim)
    sin = sin.unsqueeze(1).to(x.dtype)
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# KV cache and attention
# ----------------------------------------------------------------------------------------------------------------


class KVCache:
    """A preallocated cache of keys and values for every layer, (B, n_kv_head, max_length, head_dim) each, plus
    the document id of every cached slot so a left-padded batch never attends to its padding.

    A pass of T tokens writes its keys at the next T slots. The cache addresses them one of two ways:
      - dynamic (the default): `length`, a Python int, counts the filled slots; the pass writes at
        [length, length + T) and attends over the first length + T slots. Shapes change every pass, which suits
        prefill and any one-off use.
      - static (after `make_static()`): `cache_position`, a (1,) long tensor on the cache's device, is the first
        slot the next pass writes; the pass writes through `index_copy_` and attends over all max_length slots
        under a mask (unfilled slots lie in the future, so causality hides them). Every pass then has the same
        shapes and reads nothing back to the host, so litft.generation can capture one decoding step in a CUDA
        graph and replay it. `length` stops counting (the device holds the count)."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_length: int,
        head_dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
        value_head_dim: int | None = None,
    ) -> None:
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        vshape = (batch_size, num_kv_heads, max_length, value_head_dim or head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(vshape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.document_ids = torch.ones(batch_size, max_length, device=device, dtype=torch.long)
        self.max_length = max_length
        self.length = 0
        self.cache_position: torch.Tensor | None = None  # (1,), static mode only
        self.write_slots: torch.Tensor | None = None  # (T,): where the current pass writes, static mode only

    @property
    def static(self) -> bool:
        return self.cache_position is not None

    def make_static(self) -> None:
        """Switches to static addressing (if not already static), continuing after the slots filled so far."""
        if not self.static:
            self.cache_position = torch.tensor([self.length], device=self.document_ids.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new keys/values of `layer` and returns every slot the pass attends over, the new ones
        included: the filled ones (dynamic) or all of them (static)."""
        if self.static:
            # Slots past max_length are not checked here (that would read the device); generation never asks.
            self.keys[layer].index_copy_(2, self.write_slots, k)
            self.values[layer].index_copy_(2, self.write_slots, v)
            return self.keys[layer], self.values[layer]
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} tokens; {end} were asked for")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, seq_len: int) -> None:
        """Marks the pass's `seq_len` slots as filled. In static mode the count moves in place on the device, so
        a CUDA graph that captured this call advances it on every replay."""
        if self.static:
            self.cache_position += seq_len
        else:
            self.length += seq_len


@dataclass
class AttentionContext:
    """What every layer's attention needs besides its own q, k, v, built once per forward pass:
      - `mask`, `sliding_mask`: boolean (B, 1, T, S) masks for SDPA (None means plain causal), for full and
        sliding-window layers;
      - `block_mask`, `sliding_block_mask`: flex_attention's block-sparse masks instead, for packed rows on the
        flex path (see `use_flex_attention`); the dense masks are then None;
      - `flash_kernels`: the pass attends through FlashAttention-4's kernels (`flash_attention.rows_apply`), no
        masks built: `sliding_window` is then the sliding layers' window, given to the kernels as a number (None
        where the model has none shorter than the rows), and for packed rows `document_offsets` says where each
        document begins among the batch's tokens laid end to end (`flash_attention.document_offsets`);
      - the KV cache if one is in use.
    Layers call `attend(q, k, v, context, sliding=...)`, which picks the path."""

    mask: torch.Tensor | None
    sliding_mask: torch.Tensor | None
    kv_cache: KVCache | None
    is_causal: bool
    block_mask: BlockMask | None = None
    sliding_block_mask: BlockMask | None = None
    flash_kernels: bool = False
    sliding_window: int | None = None
    document_offsets: torch.Tensor | None = None


def build_attention_context(
    batch_size: int,
    seq_len: int,
    device: torch.device,
    document_ids: torch.Tensor | None,
    kv_cache: KVCache | None,
    sliding_window: int | None,
    document_offsets: torch.Tensor | None = None,
    flash_kernels: bool = False,
) -> AttentionContext:
    """Builds the masks for this forward pass.

    `document_ids` (B, T) says which document each token belongs to: a token attends only to earlier tokens of
    its own document. This serves packed rows (one id per sample) and padded batches (padding gets its own id).
    Without a KV cache, where the caller found FlashAttention-4's kernels usable (`flash_kernels`, see
    `CausalLM.hidden_states`), no mask is built: the kernels get the window as a number, and packed rows the
    documents' offsets (`document_offsets` where the collate function found them, else found here). Else, for
    packed rows where `use_flex_attention` allows, flex_attention block masks. Otherwise the masks are boolean,
    (B, 1, T, S) (True = may attend); with a KV cache they also cover every cached slot, whose document ids the
    cache keeps. Without documents or cache offsets the full layers' mask is None and SDPA's causal fast path runs
    (the sliding layers' mask too, where the window covers every key)."""
    if kv_cache is None and flash_kernels:
        if document_ids is None:
            document_offsets = None
        elif document_offsets is None:
            document_offsets = flash_attention.document_offsets(document_ids)
        window = sliding_window if sliding_window is not None and sliding_window < seq_len else None
        return AttentionContext(None, None, None, is_causal=True, flash_kernels=True, sliding_window=window,
                                document_offsets=None if document_offsets is None else document_offsets.to(device))
    if kv_cache is None and document_ids is not None and use_flex_attention(device):
        return _flex_attention_context(document_ids, sliding_window)
    if kv_cache is not None and kv_cache.static:
        return _static_attention_context(batch_size, seq_len, device, document_ids, kv_cache, sliding_window)
    offset = kv_cache.length if kv_cache is not None else 0
    total = offset + seq_len
    needs_window = sliding_window is not None and total > sliding_window
    if document_ids is None and offset == 0:
        if kv_cache is not None:
            kv_cache.document_ids[:, :total] = 1
        sliding_mask = None
        if needs_window:
            # Only the sliding layers need a mask: full layers keep SDPA's causal fast path (a dense causal mask would
            # rule out its flash and cuDNN kernels).
            slots = torch.arange(total, device=device)
            _, sliding_mask = _slot_masks(batch_size, slots, slots, None, sliding_window)
        return AttentionContext(None, sliding_mask, kv_cache, is_causal=True)
    if kv_cache is not None:
        # Without document ids the new tokens are real ones (document 1); the cached ids still mask earlier padding.
        kv_cache.document_ids[:, offset:total] = 1 if document_ids is None else document_ids
        document_ids = kv_cache.document_ids[:, offset:total]
    same_document = None
    if document_ids is not None:
        key_docs = kv_cache.document_ids[:, :total] if kv_cache is not None else document_ids
        same_document = document_ids[:, :, None] == key_docs[:, None, :]  # (B, T, S)
    query_slots = torch.arange(offset, total, device=device)
    key_slots = torch.arange(total, device=device)
    mask, sliding_mask = _slot_masks(batch_size, query_slots, key_slots, same_document, sliding_window)
    return AttentionContext(mask, sliding_mask, kv_cache, is_causal=False)


def _static_attention_context(
    batch_size: int,
    seq_len: int,
    device: torch.device,
    document_ids: torch.Tensor | None,
    kv_cache: KVCache,
    sliding_window: int | None,
) -> AttentionContext:
    """The static-mode masks, over all max_length slots, computed from `cache_position` on the device: the same
    kernels on every pass, whatever slot it writes."""
    query_slots = kv_cache.cache_position + torch.arange(seq_len, device=device)  # (T,)
    kv_cache.write_slots = query_slots
    if document_ids is None:
        document_ids = torch.ones(batch_size, seq_len, dtype=torch.long, device=device)
    kv_cache.document_ids.index_copy_(1, query_slots, document_ids)
    same_document = document_ids[:, :, None] == kv_cache.document_ids[:, None, :]  # (B, T, max_length)
    key_slots = torch.arange(kv_cache.max_length, device=device)
    mask, sliding_mask = _slot_masks(batch_size, query_slots, key_slots, same_document, sliding_window)
    return AttentionContext(mask, sliding_mask, kv_cache, is_causal=False)


def _slot_masks(
    batch_size: int,
    query_slots: torch.Tensor,
    key_slots: torch.Tensor,
    same_document: torch.Tensor | None,
    sliding_window: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full and sliding-window masks, (B, 1, T, S), of queries at cache slots `query_slots` (T,) over keys
    at `key_slots` (S,): causal by slot, within a document where `same_document` (B, T, S) is given."""
    causal = key_slots[None, :] <= query_slots[:, None]  # (T, S)
    mask = causal[None, None].expand(batch_size, 1, *causal.shape)
    if same_document is not None:
        mask = mask & same_document[:, None]
    sliding_mask = None
    if sliding_window is not None:
        # Slots and positions advance together within a row (its padding sits before its first token).
        in_window = key_slots[None, :] > query_slots[:, None] - sliding_window
        sliding_mask = mask & in_window[None, None]
    return mask, sliding_mask


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention of q (B, n_head, T, hd) over k, v (B, n_kv_head, S, hd), grouped-query aware.

    Causal attention without a mask takes FlashAttention-4's kernels where `flash_attention` finds them usable
    (soft-capped too, where `flash_attention.takes` allows); elsewhere SDPA picks flash / cuDNN / memory-efficient
    kernels where it can. Logit soft-capping (Gemma 2) is not expressible in SDPA, so that path computes the scores
    explicitly: on CPU, and in generation (training rows on CUDA take flex_attention: see `flex_attend` and
    `CausalLM.hidden_states`)."""
    if flash_attention.applies(q, k, mask, is_causal) and flash_attention.takes(None, softcap, q.shape[2]):
        return flash_attention.causal_attention(q, k, v, scale, softcap=softcap)
    if softcap is None:
        B, n_head, T, head_dim = q.shape
        n_kv_head = k.shape[1]
        if T == 1 and n_head != n_kv_head and mask is not None:
            # One query per row (a decoding step): fold each kv head's group of query heads into the query axis,
            # (B, n_kv_head, group, hd). A (B, 1, 1, S) mask broadcasts over it unchanged, SDPA needs no GQA
            # support (with a mask its fused kernels may lack it, and expanding k, v would copy the whole cache).
            q = q.reshape(B, n_kv_head, n_head // n_kv_head, head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            return y.reshape(B, n_head, 1, head_dim)
        enable_gqa = n_head != n_kv_head
        if enable_gqa and mask is not None and q.device.type == "cpu":
            # Math backend with GQA + mask: expanding is as cheap and avoids a slow path in some versions.
            k, v, enable_gqa = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1]), False
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, scale=scale, enable_gqa=enable_gqa
        )
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, n_head, T, S)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None and is_causal:
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v


def _expand_kv(x: torch.Tensor, n_head: int) -> torch.Tensor:
    n_kv = x.shape[1]
    if n_kv == n_head:
        return x
    return x.repeat_interleave(n_head // n_kv, dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Flex attention for packed rows
# ----------------------------------------------------------------------------------------------------------------

# Where packed rows (document_ids given, no KV cache) attend through flex_attention instead of SDPA with a dense
# (B, 1, T, S) mask, which rules out SDPA's flash kernels and computes every cross-document and padding score:
#   "auto": on CUDA only. On CPU flex_attention has no backward pass (torch refuses it), no speed advantage, and
#           a compiled kernel that torch 2.13 sometimes fails to build once shapes turn dynamic;
#   "always": wherever it applies, whatever the device (tests force the path this way on CPU, forward only);
#   "never": dense masks everywhere.
# Passes with a KV cache (generation) always use the dense masks.
FLEX_ATTENTION = "auto"
FLEX_ATTENTION_MODES = ("auto", "always", "never")

# The sparse block size of the block masks, flex_attention's default: a (128, 128) tile of scores is skipped when
# no query in it may see any of its keys, computed without the mask function when every query sees every key, and
# under it otherwise.
FLEX_BLOCK_SIZE = 128

_compiled_flex_attention: Callable[..., torch.Tensor] | None = None


def use_flex_attention(device: torch.device | str) -> bool:
    """Whether packed rows on `device` take the flex_attention path, as `FLEX_ATTENTION` says."""
    if FLEX_ATTENTION not in FLEX_ATTENTION_MODES:
        raise ValueError(f"FLEX_ATTENTION is {FLEX_ATTENTION!r}; expected one of {', '.join(FLEX_ATTENTION_MODES)}")
    if FLEX_ATTENTION == "auto":
        return torch.device(device).type == "cuda"
    return FLEX_ATTENTION == "always"


def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """flex_attention under torch.compile. Run eagerly it materialises every score (and warns); compiled it is one
    fused kernel that skips the blocks the mask empties. Inside an already compiled decoder block dynamo inlines
    it into the block's graph. Made on first use: torch.compile imports dynamo, which costs seconds at start-up."""
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention)
    return _compiled_flex_attention


def document_mask_mod(document_ids: torch.Tensor, sliding_window: int | None) -> Callable[..., torch.Tensor]:
    """flex_attention's mask function for rows of documents `document_ids` (B, L): query i may attend to key j
    when j <= i, both belong to the same document and, given a window, i - j < sliding_window (the rule of
    `_slot_masks`). It takes index tensors of any broadcastable shapes, so it also evaluates a whole tile at once.

    The window travels as a tensor ("no window" is one longer than the row), so full and sliding layers share one
    mask function and one compiled kernel: a Python int would be specialised on, and every distinct function
    compiled again, bringing dynamo closer to its recompile limit (past it, flex_attention runs uncompiled)."""
    window = torch.full((), sliding_window or document_ids.shape[1] + 1, device=document_ids.device)

    def causal_within_document_and_window(batch, head, query_index, key_index):
        same_document = document_ids[batch, query_index] == document_ids[batch, key_index]
        in_window = query_index - key_index < window
        return (key_index <= query_index) & same_document & in_window

    return causal_within_document_and_window


def document_block_mask(
    document_ids: torch.Tensor, sliding_window: int | None, block_size: int | None = None
) -> BlockMask:
    """The BlockMask of packed rows `document_ids` (B, T): which (block_size, block_size) tiles of scores are empty,
    which are full (every query sees every key: the mask function is skipped) and which are partial. The block
    size defaults to FLEX_BLOCK_SIZE, read at call time (tests shrink it to get many tiles from short rows).

    It is what `create_block_mask(document_mask_mod(...), B, None, T, T)` returns, but evaluated a band of query
    rows at a time: create_block_mask materialises the whole (B, T, T) mask and int64 intermediates of that size
    (5 GiB for 8 rows of 8192 tokens), several times the dense mask this path replaces."""
    block_size = block_size or FLEX_BLOCK_SIZE
    batch_size, seq_len = document_ids.shape
    device = document_ids.device
    num_blocks = -(-seq_len // block_size)
    padded_len = num_blocks * block_size
    # Padded to whole blocks so every index a kernel tile reaches is in range; the padding (id -1) sits after
    # every real token, so causality keeps real queries off it, and the kernel drops padded queries.
    padded_ids = F.pad(document_ids, (0, padded_len - seq_len), value=-1)  # (B, padded_len)
    mask_mod = document_mask_mod(padded_ids, sliding_window)

    batch = torch.arange(batch_size, device=device)[:, None, None]  # (B, 1, 1)
    keys = torch.arange(padded_len, device=device)
    # Bands of whole query blocks, each mask (B, rows, padded_len) kept to 2**26 booleans.
    rows_per_band = block_size * max(1, 2**26 // (batch_size * padded_len * block_size))
    partial_bands, full_bands = [], []
    for start in range(0, padded_len, rows_per_band):
        queries = torch.arange(start, min(start + rows_per_band, padded_len), device=device)
        allowed = mask_mod(batch, 0, queries[None, :, None], keys[None, None, :])  # (B, rows, padded_len)
        # Tiles that reach past the sequence are never full, as create_block_mask pads its mask with False.
        allowed = allowed & (queries[:, None] < seq_len) & (keys[None, :] < seq_len)
        tiles = allowed.view(batch_size, -1, block_size, num_blocks, block_size)  # (B, q_blocks, bs, kv_blocks, bs)
        any_allowed = tiles.any(dim=4).any(dim=2)  # (B, q_blocks, kv_blocks)
        all_allowed = tiles.all(dim=4).all(dim=2)
        partial_bands.append(any_allowed & ~all_allowed)
        full_bands.append(all_allowed)
    partial = torch.cat(partial_bands, dim=1)  # (B, num_blocks, num_blocks)
    full = torch.cat(full_bands, dim=1)

    def counts_and_indices(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Per query block: how many key blocks, and their indices first, ascending (a stable sort puts them there).
        # (B, 1, num_blocks) and (B, 1, num_blocks, num_blocks): the head axis is 1, broadcast over every head.
        counts = blocks.sum(dim=-1, dtype=torch.int32)
        indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[:, None], indices[:, None]

    kv_num_blocks, kv_indices = counts_and_indices(partial)
    full_kv_num_blocks, full_kv_indices = counts_and_indices(full)
    return BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
        BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(seq_len, seq_len),
    )


def _flex_attention_context(document_ids: torch.Tensor, sliding_window: int | None) -> AttentionContext:
    """Block masks for packed rows without a KV cache: causal within each document, and for sliding-window layers
    within the window too. Built here, outside the compiled blocks, once per forward pass for every layer."""
    compiled_flex_attention()  # made now, eagerly: the layers only look it up, also from inside compiled code
    block_mask = document_block_mask(document_ids, None)
    # Models without sliding layers never ask for the sliding mask, and a window at least as long as the row cuts
    # nothing: either way sliding layers can share the full mask.
    sliding_block_mask = block_mask
    if sliding_window is not None and sliding_window < document_ids.shape[1]:
        sliding_block_mask = document_block_mask(document_ids, sliding_window)
    return AttentionContext(None, None, None, is_causal=False, block_mask=block_mask,
                            sliding_block_mask=sliding_block_mask)


def softcap_score_mod(cap: float) -> Callable[..., torch.Tensor]:
    """flex_attention's score function for logit soft-capping (Gemma 2): tanh(score / cap) * cap, applied to the
    scaled score before the mask, as in the SDPA-free path of `attention`."""

    def softcap(score, batch, head, query_index, key_index):
        return torch.tanh(score / cap) * cap

    return softcap


def flex_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """flex_attention of q (B, n_head, T, hd) over k, v (B, n_kv_head, T, hd) under `block_mask`, grouped-query
    aware, with soft-capping as a score function: no scores are materialised on either path."""
    score_mod = softcap_score_mod(softcap) if softcap is not None else None
    return compiled_flex_attention()(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )  # (B, n_head, T, hd)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context: AttentionContext,
    sliding: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One layer's attention under this pass's `context`: FlashAttention-4's kernels where it says so (their
    variable-length ones for packed rows; the window and the cap as numbers), flex_attention where it carries block
    masks (packed rows), SDPA (`attention`) with its dense masks otherwise. `sliding` picks the sliding-window
    masks, or window."""
    if context.flash_kernels:
        # Under autocast a per-head norm (Qwen3's) hands over q and k in float32 beside a 16-bit v: the kernels take
        # one 16-bit dtype, autocast's, which is also what SDPA would cast them to.
        dtype = compute_dtype(v)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        window = context.sliding_window if sliding else None
        if context.document_offsets is not None:
            return flash_attention.packed_causal_attention(q, k, v, context.document_offsets, scale, window, softcap)
        return flash_attention.causal_attention(q, k, v, scale, window, softcap)
    block_mask = context.sliding_block_mask if sliding else context.block_mask
    if block_mask is not None:
        return flex_attend(q, k, v, block_mask, scale=scale, softcap=softcap)
    mask = context.sliding_mask if sliding else context.mask
    return attention(q, k, v, mask, context.is_causal, scale=scale, softcap=softcap)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype layers compute in on `x`: autocast's where it is on (bf16-mixed keeps float32 weights and
    activations between layers), else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def default_position_ids(batch_size: int, seq_len: int, offset: int, device: torch.device) -> torch.Tensor:
    return torch.arange(offset, offset + seq_len, device=device).unsqueeze(0).expand(batch_size, seq_len)


# ----------------------------------------------------------------------------------------------------------------
# The surface every family's ...ForCausalLM shares
# ----------------------------------------------------------------------------------------------------------------


class CausalLM(nn.Module):
    """The surface every family's ...ForCausalLM shares (see litft.models). A family says where its modules live
    (their Hugging Face names differ) and defines `decode`; the pass around it is the same everywhere:

        hidden = decode(embed(input_ids), position_ids, context)  # (B, T, hidden_size), final norm applied
        logits = logits(hidden)  # the head, plus any soft-capping

    The KV cache is sized from `config.num_hidden_layers`, `num_key_value_heads` and `head_dim`."""

    config: Any
    embeddings_name: str  # dotted submodule names, e.g. "model.embed_tokens"
    blocks_name: str  # the ModuleList of decoder layers: the unit of FSDP sharding and activation checkpointing
    head_name: str
    decode_graph_safe = True  # whether a decoding step can be recorded in a CUDA graph (no reads on the host)

    @property
    def embeddings(self) -> nn.Embedding:
        return self.get_submodule(self.embeddings_name)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.get_submodule(self.blocks_name)

    @property
    def head(self) -> nn.Linear:
        return self.get_submodule(self.head_name)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.head.weight = self.embeddings.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)  # (B, T, hidden_size)

    def decode(self, x: torch.Tensor, position_ids: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        """Rotary tables, every block, then the final norm."""
        raise NotImplementedError

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        document_offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Runs the decoder. `position_ids` (B, T) restart at 0 per document in packed rows; `document_ids` (B, T)
        keep each token's attention inside its document (`document_offsets`: where each begins, as
        `flash_attention.document_offsets` finds them, when the collate function did); with `kv_cache` the T
        tokens follow the cached ones."""
        B, T = input_ids.shape
        if position_ids is None and kv_cache is not None and kv_cache.static:
            position_ids = default_position_ids(B, T, 0, input_ids.device) + kv_cache.cache_position
        elif position_ids is None:
            offset = kv_cache.length if kv_cache is not None else 0
            position_ids = default_position_ids(B, T, offset, input_ids.device)
        window = getattr(self.config, "sliding_window", None)
        x = self.embed(input_ids)
        softcap = getattr(self.config, "attn_logit_softcapping", None)
        flash_kernels = (
            kv_cache is None and flash_attention.takes(window, softcap, T)
            and flash_attention.rows_apply(x.device, compute_dtype(x), self.config.head_dim)
        )
        if softcap is not None and document_ids is None and kv_cache is None and not flash_kernels \
                and use_flex_attention(x.device):
            # SDPA cannot cap scores: plain rows would compute and keep (B, n_head, T, T) of them in every layer.
            # flex_attention caps them inside its kernel, under a causal block mask: one document per row.
            document_ids = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
        context = build_attention_context(B, T, input_ids.device, document_ids, kv_cache, window, document_offsets,
                                          flash_kernels)
        hidden = self.decode(x, position_ids, context)
        if kv_cache is not None:
            kv_cache.advance(T)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)  # (B, T, vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        document_offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, position_ids, document_ids, kv_cache, document_offsets))

    def make_kv_cache(
        self, batch_size: int, max_length: int, device: torch.device | str, dtype: torch.dtype
    ) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_length, c.head_dim, device, dtype)
