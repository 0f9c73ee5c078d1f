"""Causal attention through FlashAttention-4's kernels, on Hopper and Blackwell GPUs where its package is installed.

The optional `flash-attn-4` package (`pip install "litft[flash]"`) holds FlashAttention's kernels written in
CUTLASS's Python DSL, compiled for the GPU at hand on first use. On an H200, at Llama's head sizes, its forward and
backward take less time than the cuDNN kernels that `scaled_dot_product_attention` picks (benchmarks/NOTES.md,
section 27); grouped-query heads are read in place, not repeated.

Here they are custom operators (a forward and its backward), so that a compiled block calls them as it calls
any kernel of its own: `torch.compile` does not trace into the kernels' Python launcher. `attention` in
`common.py` takes this path for training and evaluation rows (`rows_apply`) and for the prompt of a generation
without padding. Packed rows take the variable-length kernels (`packed_causal_attention`): the documents of a batch
laid end to end, where each one begins given by `document_offsets`, so that no score between two documents is
computed (flex_attention's block masks still compute the tiles that straddle two documents, under a mask).

Sliding windows (Mistral, Gemma 2 / 3) and logit soft-capping (Gemma 2) can be given to the kernels as numbers, on
both paths, so that those models need no mask and no explicit scores either: a window of W keys is the kernels'
`window_size_left` = W - 1 (a query sees itself and the W - 1 keys before it, the rule of `common._slot_masks`),
and the cap is applied to the scaled score, tanh(score / cap) * cap, before the mask. This is off by default
(`WINDOWS`) until its GPU tests have run on a Hopper GPU: until then a window shorter than the rows or a cap keeps a
model with SDPA's masks or flex_attention, as before. 32-bit training and KV caches stay with SDPA or flex_attention.

`FLASH_ATTENTION_4` (from the environment variable LITFT_FLASH_ATTENTION_4, "auto" without it):
  "auto":   where the package imports and the GPU is a Hopper (sm_90) or Blackwell (sm_100) one;
  "always": as "auto", but a run where the package is missing or the GPU is another fails at once, saying why;
  "never":  SDPA everywhere.
`WINDOWS` (from LITFT_FLASH_ATTENTION_4_WINDOWS, "off" without it): "on" gives windows and caps to the kernels.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from litft.errors import ConfigError

FLASH_ATTENTION_4 = os.environ.get("LITFT_FLASH_ATTENTION_4", "auto")
FLASH_ATTENTION_4_MODES = ("auto", "always", "never")
WINDOWS = os.environ.get("LITFT_FLASH_ATTENTION_4_WINDOWS", "off")
WINDOWS_MODES = ("off", "on")

# The GPU generations (compute capability major) whose kernels the package ships for training: Hopper, Blackwell.
SUPPORTED_MAJORS = (9, 10)

_kernels: ModuleType | None = None
_import_error: str | None = None


def kernels() -> ModuleType | None:
    """The package's kernel module, imported on first use (it compiles nothing yet); None where it cannot be
    imported, with the reason kept for "always"'s error."""
    global _kernels, _import_error
    if _kernels is None and _import_error is None:
        try:
            _kernels = importlib.import_module("flash_attn.cute.interface")
        except Exception as error:  # missing, or built for another CUDA: either way SDPA serves
            _import_error = f"{type(error).__name__}: {error}"
    return _kernels


def check_setting(device: torch.device) -> bool:
    """Whether causal attention on `device` runs these kernels; a ConfigError where `FLASH_ATTENTION_4` cannot hold
    there (called as a run starts, so that the error comes before anything loads or compiles)."""
    if device.type == "cuda":
        return usable_on(device.index or 0)
    _check_mode()
    if FLASH_ATTENTION_4 == "always":
        raise ConfigError(f"LITFT_FLASH_ATTENTION_4=always: FlashAttention-4 needs a Hopper or Blackwell GPU and this "
                          f"run is on {device.type}; unset it or set it to auto")
    return False


@torch.compiler.assume_constant_result
def usable_on(device_index: int) -> bool:
    """Whether CUDA device `device_index` runs these kernels under `FLASH_ATTENTION_4` (a constant to a compiled
    block, which then holds one path, not a check per call)."""
    _check_mode()
    if FLASH_ATTENTION_4 == "never":
        return False
    major = torch.cuda.get_device_capability(device_index)[0]
    if kernels() is not None and major in SUPPORTED_MAJORS:
        return True
    if FLASH_ATTENTION_4 == "always":
        reason = (f"the flash-attn-4 package does not import ({_import_error}); install it with "
                  f"pip install 'litft[flash]'" if kernels() is None
                  else f"GPU {device_index} has compute capability {major}.x; its kernels need 9.x or 10.x")
        raise ConfigError(f"LITFT_FLASH_ATTENTION_4=always: {reason}, or set it to auto")
    return False


def _check_mode() -> None:
    if FLASH_ATTENTION_4 not in FLASH_ATTENTION_4_MODES:
        raise ConfigError(f"LITFT_FLASH_ATTENTION_4 is {FLASH_ATTENTION_4!r}; set it to one of "
                          f"{', '.join(FLASH_ATTENTION_4_MODES)}")
    if WINDOWS not in WINDOWS_MODES:
        raise ConfigError(f"LITFT_FLASH_ATTENTION_4_WINDOWS is {WINDOWS!r}; set it to one of "
                          f"{', '.join(WINDOWS_MODES)}")


def takes(window: int | None, softcap: float | None, seq_len: int) -> bool:
    """Whether the kernels are given a pass over rows of `seq_len` tokens with this window and cap: always where
    neither changes anything (no window shorter than the rows, no cap), else where `WINDOWS` is on."""
    cuts = (window is not None and window < seq_len) or softcap is not None
    return not cuts or WINDOWS == "on"


def applies(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> bool:
    """Whether `attention` can hand q (B, n_head, T, hd), k (B, n_kv_head, S, hd) to these kernels: causal over
    as many keys as queries, no mask, 16-bit CUDA tensors, a head size they compile for."""
    if mask is not None or not is_causal or not q.is_cuda:
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or q.shape[2] != k.shape[2] or q.shape[2] < 2:
        return False
    head_dim = q.shape[-1]
    return head_dim % 8 == 0 and head_dim <= 256 and usable_on(q.device.index or 0)


def rows_apply(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the rows of a pass without a KV cache (training, evaluation), of a model with heads of `head_dim`
    computing in `dtype` on `device`, attend through these kernels: packed rows through the variable-length ones,
    others through the plain ones (a window or a cap where `takes` allows)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    return head_dim % 8 == 0 and head_dim <= 256 and usable_on(device.index or 0)


def document_offsets(document_ids: torch.Tensor) -> torch.Tensor:
    """Where each document of packed rows `document_ids` (B, T) begins among the rows' B * T tokens laid end to end,
    then B * T: (documents + 1,) int32, what the variable-length kernels take. A document is a run of one id
    within a row, so a row's padding (id 0 after its last document) is a document of its own: its queries see
    only padding, and it is never trained. Collating computes these on the host; on the GPU, `nonzero` makes the
    host wait for the ids."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)  # (B, T)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    begins = starts.reshape(-1).nonzero().squeeze(1)  # (documents,)
    end = torch.full((1,), document_ids.numel(), dtype=begins.dtype, device=begins.device)
    return torch.cat([begins, end]).to(torch.int32)


# The operators take a window and a cap as plain numbers (a custom operator's schema has no optional float):
NO_WINDOW = 0  # every earlier key
NO_SOFTCAP = 0.0  # the package's own "none"


def packed_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, scale: float | None,
    window: int | None = None, softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention within each document of packed rows: q (B, n_head, T, hd) over k, v (B, n_kv_head, T, hd),
    `offsets` from `document_offsets`, a query seeing at most `window` keys (itself included) and its scores
    soft-capped at `softcap`, where given; returned as (B, n_head, T, hd), a view of the kernel's (B * T, n_head,
    hd) output. q, k and v are views of (B, T, heads, hd) memory (see `causal_attention`), so flattening their
    tokens copies nothing."""
    B, n_head, T, head_dim = q.shape
    scale = scale if scale is not None else head_dim ** -0.5
    tokens = [t.transpose(1, 2).reshape(B * T, t.shape[1], t.shape[3]) for t in (q, k, v)]  # (B * T, heads, hd)
    # The row length bounds every document's and is fixed for a batch's shape: the documents' true longest would
    # be a new constant to a compiled block at every batch.
    out, _ = flash_attention_packed(*tokens, offsets, T, scale, _window(window, T), softcap or NO_SOFTCAP)
    return out.view(B, T, n_head, v.shape[-1]).transpose(1, 2)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of q (B, n_head, T, hd) over k, v (B, n_kv_head, T, hd), a query seeing at most `window`
    keys (itself included) and its scores soft-capped at `softcap`, where given; returned as (B, n_head, T, hd),
    a view of the kernel's (B, T, n_head, hd) output, which the caller's transpose back makes contiguous for free."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    out, _ = flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale,
                             _window(window, q.shape[2]), softcap or NO_SOFTCAP)
    return out.transpose(1, 2)


def _window(window: int | None, seq_len: int) -> int:
    """The operators' window: NO_WINDOW where none is given or it is at least as long as the rows (it cuts
    nothing, and the kernels' plain causal mode is the faster)."""
    if window is not None and window < 1:
        raise ValueError(f"an attention window holds at least one key (the query's own), not {window}")
    return window if window is not None and window < seq_len else NO_WINDOW


def _mask_arguments(window: int, softcap: float) -> dict:
    """The package's keywords for a causal pass with `window` keys (or NO_WINDOW) and cap `softcap` (or
    NO_SOFTCAP): a window of W keys is W - 1 keys to the left of the query's own."""
    arguments = {"causal": True, "softcap": softcap}
    if window != NO_WINDOW:
        arguments["window_size_left"] = window - 1
    return arguments


@torch.library.custom_op("litft::flash_attention", mutates_args=())
def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int, softcap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q (B, T, n_head, hd) over k, v (B, T, n_kv_head, hd), last dimension contiguous, within
    `window` keys (NO_WINDOW: all) with scores capped at `softcap` (NO_SOFTCAP: none): the output (B, T, n_head,
    hd) and each query's log-sum-exp of its scaled scores (B, n_head, T), float32."""
    B, T, n_head, _ = q.shape
    out = q.new_empty(B, T, n_head, v.shape[-1])
    lse = q.new_empty(B, n_head, T, dtype=torch.float32)
    kernels()._flash_attn_fwd(q, k, v, softmax_scale=scale, return_lse=True, out=out, lse=lse,
                              **_mask_arguments(window, softcap))
    return out, lse


@flash_attention.register_fake
def _(q, k, v, scale, window, softcap):
    B, T, n_head, _ = q.shape
    return q.new_empty(B, T, n_head, v.shape[-1]), q.new_empty(B, n_head, T, dtype=torch.float32)


@torch.library.custom_op("litft::flash_attention_backward", mutates_args=())
def flash_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    scale: float, window: int, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of q, k, v (contiguous, in their shapes) from the output's, by the saved output and
    log-sum-exp; a key/value head's gradient sums those of its group of query heads."""
    grad_q, grad_k, grad_v = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    kernels()._flash_attn_bwd(q, k, v, out, grad_out, lse, softmax_scale=scale, dq=grad_q, dk=grad_k, dv=grad_v,
                              **_mask_arguments(window, softcap))
    return grad_q, grad_k, grad_v


@flash_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, scale, window, softcap):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale, window, softcap = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.arguments = (scale, window, softcap)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v = flash_attention_backward(grad_out, q, k, v, out, lse, *ctx.arguments)
    return grad_q, grad_k, grad_v, None, None, None


flash_attention.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("litft::flash_attention_packed", mutates_args=())
def flash_attention_packed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, max_length: int, scale: float,
    window: int, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q (N, n_head, hd) over k, v (N, n_kv_head, hd), N tokens of documents laid end to end,
    document i being tokens offsets[i]:offsets[i + 1] (none longer than `max_length`), within `window` keys with
    scores capped at `softcap` (as `flash_attention`): the output (N, n_head, hd) and each query's log-sum-exp of
    its scaled scores (n_head, N), float32."""
    N, n_head, _ = q.shape
    out = q.new_empty(N, n_head, v.shape[-1])
    lse = q.new_empty(n_head, N, dtype=torch.float32)
    kernels()._flash_attn_fwd(q, k, v, cu_seqlens_q=offsets, cu_seqlens_k=offsets, max_seqlen_q=max_length,
                              max_seqlen_k=max_length, softmax_scale=scale, return_lse=True, out=out, lse=lse,
                              **_mask_arguments(window, softcap))
    return out, lse


@flash_attention_packed.register_fake
def _(q, k, v, offsets, max_length, scale, window, softcap):
    N, n_head, _ = q.shape
    return q.new_empty(N, n_head, v.shape[-1]), q.new_empty(n_head, N, dtype=torch.float32)


@torch.library.custom_op("litft::flash_attention_packed_backward", mutates_args=())
def flash_attention_packed_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    offsets: torch.Tensor, max_length: int, scale: float, window: int, softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of q, k, v (contiguous, in their shapes) of `flash_attention_packed` from the output's."""
    grad_q, grad_k, grad_v = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    kernels()._flash_attn_bwd(q, k, v, out, grad_out, lse, softmax_scale=scale, cu_seqlens_q=offsets,
                              cu_seqlens_k=offsets, max_seqlen_q=max_length, max_seqlen_k=max_length, dq=grad_q,
                              dk=grad_k, dv=grad_v, **_mask_arguments(window, softcap))
    return grad_q, grad_k, grad_v


@flash_attention_packed_backward.register_fake
def _(grad_out, q, k, v, out, lse, offsets, max_length, scale, window, softcap):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_packed_context(ctx, inputs, output) -> None:
    q, k, v, offsets, max_length, scale, window, softcap = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, offsets)
    ctx.arguments = (max_length, scale, window, softcap)


def _packed_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, offsets = ctx.saved_tensors
    grads = flash_attention_packed_backward(grad_out.contiguous(), q, k, v, out, lse, offsets, *ctx.arguments)
    return *grads, None, None, None, None, None


flash_attention_packed.register_autograd(_packed_backward, setup_context=_setup_packed_context)
