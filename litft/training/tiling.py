"""The MLP of every decoder block run on tiles of the sequence (`--train.mlp_tile_tokens`), for very long sequences.

Why: with activation checkpointing (and offload) what is left of a long sequence's memory is the transient work of
one block, and most of it is the MLP's. llama-8b's SwiGLU MLP makes gate and up (14336 wide), silu(gate) and their
product, each (tokens x 14336): in bf16 28 KiB per token and tensor. Eager autograd keeps all four for the backward
(112 KiB per token; compiled, or through LoRA's down operator `litft.adapters.lora_gated_down`, gate and up:
56 KiB) and the backward makes their gradients on top, in the backward of
the one recomputed block: 10.7 GiB of kept intermediates at 100k tokens, 64 GiB at 600k. The MLP works on each token
independently, so running it on `tile_tokens` tokens at a time gives the same result, and with each tile under
non-reentrant `torch.utils.checkpoint` only one tile's intermediates are ever alive, in the forward and the backward
(0.9 GiB and their gradients for a tile of 8192 tokens). The MLP then keeps only its input for the backward, which
LoRA's A factor of gate and up needs untiled as well (8 KiB per token at hidden 4096).

What it costs: each tile's MLP runs forward once more, in the backward (under activation checkpointing three MLP
forwards per step instead of two, without it two instead of one); a quantized (QLoRA) base dequantizes its weights once per tile and pass,
so tiles should be thousands of tokens, not hundreds; the concatenated output is one more (tokens x hidden) tensor
for a moment; and with LoRA dropout the masks are drawn tile by tile, other masks than an untiled run draws from
the same seed (equally random, and the recomputation replays them exactly). Sequences of at most `tile_tokens`
tokens (batch x length) run the MLP untouched, at no cost.

Under `--compile` (torch.compile of each block) the tile loop runs eagerly: traced, its number of tiles would be
baked into the graph and every other sequence length would compile the block again. The block is compiled around
the MLP, and for sequences that fit in one tile the MLP stays inside the compiled graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from litft.errors import ConfigError


def enable_tiled_mlp(model: nn.Module, tile_tokens: int) -> None:
    """Runs the MLP of each decoder block of `model` (a litft `CausalLM`) on tiles of at most `tile_tokens` tokens.

    The MLP's `forward` is wrapped on the instance, so module and parameter names stay unchanged (checkpoints and
    adapters keep their keys). Independent of activation checkpointing and compilation, which wrap the block."""
    if isinstance(tile_tokens, bool) or not isinstance(tile_tokens, int) or tile_tokens < 1:
        raise ConfigError(f"--train.mlp_tile_tokens {tile_tokens!r}: must be a whole number of tokens, at least 1")
    for block in model.blocks:
        mlp = block_mlp(block)
        if isinstance(mlp.forward, TiledForward):  # enabled before: only the tile size changes
            mlp.forward.tile_tokens = tile_tokens
        else:
            mlp.forward = TiledForward(mlp.forward, tile_tokens)


def block_mlp(block: nn.Module) -> nn.Module:
    """A decoder block's MLP (dense or a mixture of experts, which Mixtral's checkpoints call `block_sparse_moe`)."""
    return getattr(block, getattr(block, "mlp_name", "mlp"))


class TiledForward:
    """An MLP's `forward` that runs sequences longer than `tile_tokens` (batch x length) tile by tile."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], tile_tokens: int) -> None:
        self.forward = forward  # the MLP class's forward, bound to the module
        self.tile_tokens = tile_tokens

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if math.prod(x.shape[:-1]) <= self.tile_tokens:
            return self.forward(x)
        return run_in_tiles(self.forward, self.tile_tokens, x)

    def __repr__(self) -> str:
        return f"TiledForward(tile_tokens={self.tile_tokens})"


# A traced loop would fix the number of tiles in the compiled graph (a recompilation for every other length, then
# eager fallback for the whole block once torch's recompile limit is reached); kept out, only the MLP runs eagerly.
@torch.compiler.disable
def run_in_tiles(forward: Callable[[torch.Tensor], torch.Tensor], tile_tokens: int, x: torch.Tensor) -> torch.Tensor:
    *leading, hidden = x.shape
    # One row of batch x length tokens: every tile is then a contiguous view, also when a tile spans two rows.
    tiles = x.reshape(1, -1, hidden).split(tile_tokens, dim=1)
    if torch.is_grad_enabled():
        # Without the checkpoint autograd would keep every tile's intermediates until the backward, as untiled.
        outputs = [checkpoint(forward, tile, use_reentrant=False) for tile in tiles]
    else:
        outputs = [forward(tile) for tile in tiles]
    return torch.cat(outputs, dim=1).view(*leading, -1)
