"""q, k and v as attention takes them (`attention_heads`, for Llama's and Gemma's attention), and, from the one
tensor their projections wrote side by side, with a backward that writes the gradient of that tensor in one pass.

Where q, k and v come out of one GEMM (a fused qkv_proj, or LoRA's grouped operator with the frozen weights joined),
the model splits the (B, T, q + k + v) output into heads, (B, n_head, T, head_dim), and rotates q and k. Autograd's
backward of that walks the same steps in reverse: the rotation's gradient of q and of k, then a concatenation of
q's, k's and v's gradients into the (B, T, q + k + v) gradient the GEMM's backward reads. torch.compile fuses it
into one kernel, but one that ran at ~1.5 TB/s on an H200 (135 us per llama-8b layer, ~1% of a LoRA step; this
kernel takes 51 us in the step: benchmarks/NOTES.md, section 17). Here the forward is the same torch code as before
(compiled, it fuses as before), and the backward is one kernel of ours: a program per (row of heads, block of
tokens) reads that head's gradient once, rotates it back (or copies it, for v) in float32, and writes its columns of
the joined gradient, rounded once.

Rotation (rotate_half convention, x = [x1 | x2] over the rotary dims, c and s per token and pair):
    forward   y1 = x1 c - x2 s,     y2 = x2 c + x1 s
    backward  dx1 = dy1 c + dy2 s,  dx2 = dy2 c - dy1 s
Dims past the rotary ones (partial rotary: Phi-3's, Phi-4-mini's) pass through. c and s are the float32 tables
rounded to the activations' dtype, as the forward multiplied by them.

Without Triton (CPU, outside the interpreter) the backward is the same formula as torch operations; in float32
it gives autograd's numbers bit for bit.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from litft.models.common import apply_rotary, project, project_joined
from litft.triton_support import kernels_run_on, launching_on

ENABLED = True  # False: the model splits and rotates as written, autograd's backward (the benchmarks' A/B)
BLOCK_TOKENS = 64  # tokens per program; a program takes one head of one row
WARPS = 4

rotated_rows = None  # the kernel's jitted helper, a module global once built (see _kernel)


def into_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int,
    n_kv_head: int, head_dim: int, q_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The projections' outputs q (B, T, n_head head_dim), k, v (B, T, n_kv_head head_dim), as attention takes them:
    q (B, n_head, T, head_dim) and k, v (B, n_kv_head, T, head_dim), each head of q and k normalized where the
    model has per-head norms (Qwen3, Gemma 3), then rotated by cos, sin (B, T, rotary_dim). v becomes a tensor of
    its own: as a block of a joined output it would keep all of that alive as what attention saves for its backward."""
    B, T, _ = q.shape
    q = q.view(B, T, n_head, head_dim)  # (B, T, n_head, head_dim)
    k = k.view(B, T, n_kv_head, head_dim)
    v = v.contiguous().view(B, T, n_kv_head, head_dim)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, n_head, T, head_dim)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def split_heads(
    joined: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int, n_kv_head: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`into_heads` of the three column blocks of joined (B, T, (n_head + 2 n_kv_head) head_dim)."""
    return into_heads(*_column_blocks(joined, n_head, n_kv_head, head_dim), cos, sin, n_head, n_kv_head, head_dim)


def _column_blocks(joined: torch.Tensor, n_head: int, n_kv_head: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    return joined.split([n_head * head_dim, n_kv_head * head_dim, n_kv_head * head_dim], dim=-1)


def attention_heads(
    x: torch.Tensor, attention: nn.Module, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, n_head, T, head_dim) and k, v (B, n_kv_head, T, head_dim) of an attention module over x (B, T, hidden):
    its q_proj, k_proj, v_proj (or one fused qkv_proj), its per-head q_norm and k_norm where it has them, q and k
    rotated by cos, sin (B, T, rotary_dim, float32). Where the three projections come out as one tensor and no
    per-head norm comes between, through `rotary_heads`."""
    heads = attention.n_head, attention.n_kv_head, attention.head_dim
    if hasattr(attention, "qkv_proj"):
        joined = attention.qkv_proj(x)  # (B, T, (n_head + 2 n_kv_head) head_dim)
    else:  # one tensor where the three are one GEMM (LoRA's grouped operator), else None
        joined = project_joined(x, attention.q_proj, attention.k_proj, attention.v_proj)
    q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
    if joined is not None and q_norm is None:
        return rotary_heads(joined, cos, sin, *heads)
    if joined is not None:
        q, k, v = _column_blocks(joined, *heads)
    else:
        q, k, v = project(x, attention.q_proj, attention.k_proj, attention.v_proj)
    return into_heads(q, k, v, cos, sin, *heads, q_norm, k_norm)


class RotaryHeads(torch.autograd.Function):
    """`split_heads` forward; the joined gradient from one kernel backward."""

    @staticmethod
    def forward(ctx: Any, joined: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int, n_kv_head: int,
                head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        return split_heads(joined, cos, sin, n_head, n_kv_head, head_dim)

    @staticmethod
    def backward(ctx: Any, grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor) -> tuple:
        cos, sin = ctx.saved_tensors
        return rotary_heads_backward(grad_q, grad_k, grad_v, cos, sin), None, None, None, None, None


def rotary_heads(
    joined: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int, n_kv_head: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, heads, T, head_dim) from the projections' joined output (B, T, q + k + v), q and k rotated by the
    float32 tables cos, sin (B, T, rotary_dim) rounded to joined's dtype (as `apply_rotary` multiplies)."""
    cos, sin = cos.to(joined.dtype), sin.to(joined.dtype)
    if not ENABLED or not torch.is_grad_enabled() or not joined.requires_grad:
        return split_heads(joined, cos, sin, n_head, n_kv_head, head_dim)
    return RotaryHeads.apply(joined, cos, sin, n_head, n_kv_head, head_dim)


@torch.library.custom_op("litft::rotary_heads_backward", mutates_args=())
def rotary_heads_backward(
    grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """The gradient of the joined (B, T, q + k + v) tensor, from those of q, k (rotated) and v (B, heads, T,
    head_dim, any strides), and the tables cos, sin (B or 1, T, rotary_dim) in the gradients' dtype."""
    B, n_head, T, head_dim = grad_q.shape
    n_kv_head = grad_k.shape[1]
    heads = n_head + 2 * n_kv_head
    if not kernels_run_on(grad_q) or grad_q.numel() == 0:
        return _backward_torch(grad_q, grad_k, grad_v, cos, sin).reshape(B, T, heads * head_dim)
    grad_q, grad_k, grad_v = (grad if grad.stride(-1) == 1 else grad.contiguous() for grad in (grad_q, grad_k, grad_v))
    cos, sin = (table.expand(B, T, table.shape[-1]) for table in (cos, sin))
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    rotary_dim = cos.shape[-1]
    out = torch.empty(B, T, heads * head_dim, dtype=grad_q.dtype, device=grad_q.device)
    with launching_on(grad_q):
        _kernel()[(_ceil_div(T, BLOCK_TOKENS), B * heads)](
            grad_q, grad_k, grad_v, cos, sin, out, T, n_head, n_kv_head,
            *grad_q.stride()[:3], *grad_k.stride()[:3], *grad_v.stride()[:3], cos.stride(0), cos.stride(1),
            HEAD_DIM=head_dim, HEAD_BLOCK=_power_of_two(head_dim),
            HALF=rotary_dim // 2, HALF_BLOCK=_power_of_two(rotary_dim // 2),
            PASS=head_dim - rotary_dim, PASS_BLOCK=_power_of_two(head_dim - rotary_dim),
            BLOCK_TOKENS=BLOCK_TOKENS, num_warps=WARPS,
        )
    return out


@rotary_heads_backward.register_fake
def _(grad_q, grad_k, grad_v, cos, sin):
    B, n_head, T, head_dim = grad_q.shape
    return grad_q.new_empty(B, T, (n_head + 2 * grad_k.shape[1]) * head_dim)


def _backward_torch(grad_q, grad_k, grad_v, cos, sin) -> torch.Tensor:
    """(B, T, heads, head_dim): the kernel's formula as torch operations (in float32, autograd's exact numbers)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, rotary_dim)
    half = cos.shape[-1] // 2

    def rotated_back(grad):
        first, second, rest = grad[..., :half], grad[..., half : 2 * half], grad[..., 2 * half :]
        cos_half, sin_half = cos[..., :half], sin[..., :half]
        if grad.dtype != torch.float32:  # the kernel's float32 arithmetic, rounded once
            first, second, cos_half, sin_half = first.float(), second.float(), cos_half.float(), sin_half.float()
        return torch.cat(((first * cos_half + second * sin_half).to(grad.dtype),
                          (second * cos_half - first * sin_half).to(grad.dtype), rest), dim=-1)

    heads = torch.cat((rotated_back(grad_q), rotated_back(grad_k), grad_v), dim=1)  # (B, heads, T, head_dim)
    return heads.transpose(1, 2)


def _power_of_two(size: int) -> int:
    return 1 << max(0, size - 1).bit_length() if size > 0 else 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _kernel():
    # Built on first use (the interpreter is chosen when a function is decorated). No triton.language jitted
    # helpers (tl.cdiv, tl.zeros): they are built when triton is imported and would not be interpreted in a
    # process that chose the interpreter later. The kernel calls a jitted function of ours, resolved through this
    # module's globals.
    global rotated_rows
    import triton
    import triton.language as tl

    def rows_of_head(grad_ptr, row_stride, head_stride, token_stride, head, cos_ptr, sin_ptr, out_ptr,
                     b, first_token, tokens, table_row_stride, table_token_stride, out_token_stride, column,
                     ROTATE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_BLOCK: tl.constexpr,
                     HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
                     PASS: tl.constexpr, PASS_BLOCK: tl.constexpr, BLOCK_TOKENS: tl.constexpr):
        token = first_token + tl.arange(0, BLOCK_TOKENS)
        token_inside = token < tokens
        source = grad_ptr + b.to(tl.int64) * row_stride + head.to(tl.int64) * head_stride \
            + token.to(tl.int64)[:, None] * token_stride  # (BLOCK_TOKENS, 1)
        target = out_ptr + (b.to(tl.int64) * tokens + token.to(tl.int64))[:, None] * out_token_stride + column
        if ROTATE:
            pair = tl.arange(0, HALF_BLOCK)
            inside = token_inside[:, None] & (pair < HALF)[None, :]
            first = tl.load(source + pair[None, :], mask=inside, other=0.0).to(tl.float32)
            second = tl.load(source + HALF + pair[None, :], mask=inside, other=0.0).to(tl.float32)
            table = b.to(tl.int64) * table_row_stride + token.to(tl.int64)[:, None] * table_token_stride \
                + pair[None, :]
            cos = tl.load(cos_ptr + table, mask=inside, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + table, mask=inside, other=0.0).to(tl.float32)
            tl.store(target + pair[None, :], (first * cos + second * sin).to(out_ptr.dtype.element_ty), mask=inside)
            tl.store(target + HALF + pair[None, :], (second * cos - first * sin).to(out_ptr.dtype.element_ty),
                     mask=inside)
            if PASS > 0:
                rest = tl.arange(0, PASS_BLOCK)
                rest_inside = token_inside[:, None] & (rest < PASS)[None, :]
                passed = tl.load(source + 2 * HALF + rest[None, :], mask=rest_inside, other=0.0)
                tl.store(target + 2 * HALF + rest[None, :], passed, mask=rest_inside)
        else:
            dim = tl.arange(0, HEAD_BLOCK)
            inside = token_inside[:, None] & (dim < HEAD_DIM)[None, :]
            tl.store(target + dim[None, :], tl.load(source + dim[None, :], mask=inside, other=0.0), mask=inside)

    rotated_rows = triton.jit(rows_of_head)

    @triton.jit
    def rotary_heads_backward_kernel(
        grad_q_ptr, grad_k_ptr, grad_v_ptr, cos_ptr, sin_ptr, out_ptr, tokens, n_head, n_kv_head,
        q_row_stride, q_head_stride, q_token_stride, k_row_stride, k_head_stride, k_token_stride,
        v_row_stride, v_head_stride, v_token_stride, table_row_stride, table_token_stride,
        HEAD_DIM: tl.constexpr, HEAD_BLOCK: tl.constexpr, HALF: tl.constexpr, HALF_BLOCK: tl.constexpr,
        PASS: tl.constexpr,
        PASS_BLOCK: tl.constexpr, BLOCK_TOKENS: tl.constexpr,
    ):
        first_token = tl.program_id(0) * BLOCK_TOKENS
        heads = n_head + 2 * n_kv_head
        b = tl.program_id(1) // heads
        head = tl.program_id(1) % heads  # q's heads, then k's, then v's: also the order of the joined columns
        column = head * HEAD_DIM
        out_token_stride = heads * HEAD_DIM
        if head < n_head:
            rotated_rows(grad_q_ptr, q_row_stride, q_head_stride, q_token_stride, head, cos_ptr, sin_ptr, out_ptr,
                         b, first_token, tokens, table_row_stride, table_token_stride, out_token_stride, column,
                         True, HEAD_DIM, HEAD_BLOCK, HALF, HALF_BLOCK, PASS, PASS_BLOCK, BLOCK_TOKENS)
        elif head < n_head + n_kv_head:
            rotated_rows(grad_k_ptr, k_row_stride, k_head_stride, k_token_stride, head - n_head, cos_ptr, sin_ptr,
                         out_ptr, b, first_token, tokens, table_row_stride, table_token_stride, out_token_stride,
                         column, True, HEAD_DIM, HEAD_BLOCK, HALF, HALF_BLOCK, PASS, PASS_BLOCK, BLOCK_TOKENS)
        else:
            rotated_rows(grad_v_ptr, v_row_stride, v_head_stride, v_token_stride, head - n_head - n_kv_head,
                         cos_ptr, sin_ptr, out_ptr, b, first_token, tokens, table_row_stride, table_token_stride,
                         out_token_stride, column, False, HEAD_DIM, HEAD_BLOCK, HALF, HALF_BLOCK, PASS, PASS_BLOCK,
                         BLOCK_TOKENS)

    return rotary_heads_backward_kernel

