"""The Triton kernels of `litft.kernels.gated_activation` (which holds their definition in plain torch and says
what they fuse). Imported only where a kernel runs: a CUDA device, or Triton's interpreter in the tests."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from litft.kernels.gated_activation import ACTIVATIONS


@triton.jit
def activation_and_slope(gate, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:
        sigmoid = tl.sigmoid(gate)
        return gate * sigmoid, sigmoid * (1 + gate * (1 - sigmoid))
    inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
    tanh = 2 * tl.sigmoid(2 * inner) - 1
    slope = 0.5 * (1 + tanh) + 0.5 * gate * (1 - tanh * tanh) * 0.7978845608028654 * (1 + 0.134145 * gate * gate)
    return 0.5 * gate * (1 + tanh), slope

@triton.jit
def forward_kernel(gate_ptr, up_ptr, a_ptr, hidden_ptr, low_ptr, M, I, R, M_BUCKET,
                   ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, RANK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_offsets = rows.to(tl.int64)[:, None] * I  # 64-bit: M x I passes 2^31 for long sequences
    ranks = tl.arange(0, RANK)
    low = tl.zeros((BLOCK_M, RANK), tl.float32)
    for start in range(0, I, BLOCK_I):
        columns = start + tl.arange(0, BLOCK_I)
        inside = (rows[:, None] < M) & (columns[None, :] < I)
        gate = tl.load(gate_ptr + row_offsets + columns[None, :], mask=inside, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + row_offsets + columns[None, :], mask=inside, other=0.0).to(tl.float32)
        act, _ = activation_and_slope(gate, ACTIVATION)
        hidden = (act * up).to(hidden_ptr.dtype.element_ty)  # (BLOCK_M, BLOCK_I)
        tl.store(hidden_ptr + row_offsets + columns[None, :], hidden, mask=inside)
        a_tile = tl.load(a_ptr + ranks[None, :] * I + columns[:, None],  # (s A)^T: (BLOCK_I, RANK)
                         mask=(ranks[None, :] < R) & (columns[:, None] < I), other=0.0)
        low += tl.dot(hidden, a_tile)
    tl.store(low_ptr + rows[:, None] * R + ranks[None, :], low.to(low_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (ranks[None, :] < R))

@triton.jit
def backward_kernel(grad_hidden_ptr, gate_ptr, up_ptr, b_gate_ptr, b_up_ptr, grad_gate_ptr, grad_up_ptr,
                    hidden_ptr, low_gate_ptr, low_up_ptr, M, I, R_GATE, R_UP, M_BUCKET,
                    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
                    RANK_GATE: tl.constexpr, RANK_UP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_offsets = rows.to(tl.int64)[:, None] * I
    ranks_gate, ranks_up = tl.arange(0, RANK_GATE), tl.arange(0, RANK_UP)
    low_gate = tl.zeros((BLOCK_M, RANK_GATE), tl.float32)
    low_up = tl.zeros((BLOCK_M, RANK_UP), tl.float32)
    for start in range(0, I, BLOCK_I):
        columns = start + tl.arange(0, BLOCK_I)
        inside = (rows[:, None] < M) & (columns[None, :] < I)
        offsets = row_offsets + columns[None, :]
        grad_hidden = tl.load(grad_hidden_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        act, slope = activation_and_slope(gate, ACTIVATION)
        dtype = hidden_ptr.dtype.element_ty
        grad_gate = (grad_hidden * up * slope).to(dtype)
        grad_up = (grad_hidden * act).to(dtype)
        tl.store(grad_gate_ptr + offsets, grad_gate, mask=inside)
        tl.store(grad_up_ptr + offsets, grad_up, mask=inside)
        tl.store(hidden_ptr + offsets, (act * up).to(dtype), mask=inside)
        b_gate = tl.load(b_gate_ptr + columns[:, None] * R_GATE + ranks_gate[None, :],  # (BLOCK_I, RANK_GATE)
                         mask=(columns[:, None] < I) & (ranks_gate[None, :] < R_GATE), other=0.0)
        b_up = tl.load(b_up_ptr + columns[:, None] * R_UP + ranks_up[None, :],
                       mask=(columns[:, None] < I) & (ranks_up[None, :] < R_UP), other=0.0)
        low_gate += tl.dot(grad_gate, b_gate)
        low_up += tl.dot(grad_up, b_up)
    tl.store(low_gate_ptr + rows[:, None] * R_GATE + ranks_gate[None, :], low_gate.to(low_gate_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (ranks_gate[None, :] < R_GATE))
    tl.store(low_up_ptr + rows[:, None] * R_UP + ranks_up[None, :], low_up.to(low_up_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (ranks_up[None, :] < R_UP))


if os.environ.get("TRITON_INTERPRET") != "1":  # a GPU
    # Each block of rows streams a few MB; which tile keeps HBM busiest depends on the GPU: measured, not guessed.
    _configs = [
        triton.Config({"BLOCK_M": block_m, "BLOCK_I": block_i}, num_warps=warps, num_stages=stages)
        for block_m, block_i, warps, stages in [
            (16, 256, 4, 3), (32, 128, 4, 3), (32, 256, 8, 3), (64, 128, 8, 3), (64, 64, 4, 4), (16, 128, 4, 4),
        ]
    ]
    forward_kernel = triton.autotune(_configs, key=["I", "R", "M_BUCKET", "ACTIVATION"])(forward_kernel)
    # The backward writes h over d(h): the tuner restores d(h) between its trial runs.
    backward_kernel = triton.autotune(
        _configs, key=["I", "R_GATE", "R_UP", "M_BUCKET", "ACTIVATION"], restore_value=["grad_hidden_ptr"]
    )(backward_kernel)
    FIXED_TILES: dict[str, int] = {}
else:  # Triton's interpreter (the tests, on CPU): one small tile, so that masks and several programs are exercised
    FIXED_TILES = {"BLOCK_M": 16, "BLOCK_I": 64}


def _padded_rank(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())  # tl.dot needs 16 or more, a power of two


def _bucket(rows: int) -> int:
    return 1 << max(rows - 1, 0).bit_length()  # autotune once per power of two of the token count, not per batch


def _grid(rows: int):
    return lambda meta: ((rows + meta["BLOCK_M"] - 1) // meta["BLOCK_M"],)


def triton_gated_forward(gate, up, lora_a_down, activation):
    rows, width = gate.shape
    hidden = torch.empty_like(gate)
    low = gate.new_empty((rows, lora_a_down.shape[0]))
    forward_kernel[_grid(rows)](
        gate, up, lora_a_down.contiguous(), hidden, low, rows, width, lora_a_down.shape[0], _bucket(rows),
        ACTIVATION=ACTIVATIONS[activation], RANK=_padded_rank(lora_a_down.shape[0]), **FIXED_TILES,
    )
    return hidden, low


def triton_gated_backward(grad_hidden, gate, up, lora_b_gate, lora_b_up, activation):
    rows, width = gate.shape
    grad_hidden = grad_hidden.contiguous()
    # h overwrites d(h): each program reads a tile before it writes the same tile, and no two share a row.
    grad_gate, grad_up, hidden = torch.empty_like(gate), torch.empty_like(gate), grad_hidden
    low_gate = gate.new_empty((rows, lora_b_gate.shape[1]))
    low_up = gate.new_empty((rows, lora_b_up.shape[1]))
    backward_kernel[_grid(rows)](
        grad_hidden, gate, up, lora_b_gate.contiguous(), lora_b_up.contiguous(), grad_gate, grad_up,
        hidden, low_gate, low_up, rows, width, lora_b_gate.shape[1], lora_b_up.shape[1], _bucket(rows),
        ACTIVATION=ACTIVATIONS[activation], RANK_GATE=_padded_rank(lora_b_gate.shape[1]),
        RANK_UP=_padded_rank(lora_b_up.shape[1]), **FIXED_TILES,
    )
    return grad_gate, grad_up, low_gate, low_up, hidden
