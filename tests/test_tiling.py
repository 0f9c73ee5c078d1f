"""`--train.mlp_tile_tokens`: the MLP run on tiles of the sequence gives the loss and gradients of the untiled model
(every family, LoRA and QLoRA, under activation checkpointing and torch.compile), and keeps far less memory."""

from __future__ import annotations

import pytest
import torch
from test_lora import input_ids, randomize_adapter
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from litft.adapters.lora import LoRAConfig, apply_lora
from litft.checkpoint import load_model
from litft.errors import ConfigError
from litft.models import build_model
from litft.training import tiling
from litft.training.compilation import compile_blocks
from litft.training.loss import CausalLMObjective
from litft.training.strategies import enable_activation_checkpointing
from litft.training.tiling import enable_tiled_mlp

BATCH, LENGTH, TILE = 2, 24, 7  # 48 tokens: six tiles of 7 and one of 6, some across the two rows


def lora_model(checkpoint_dir, quantize: str | None = None, **lora_options) -> nn.Module:
    prepare = None
    if quantize is not None:
        from litft.adapters.quantization import quantize_model

        def prepare(meta: nn.Module) -> None:
            quantize_model(meta, quantize, compute_dtype=torch.float32)

    model = load_model(checkpoint_dir, dtype=torch.float32, prepare=prepare)
    apply_lora(model, LoRAConfig(rank=4, targets=["all-linear"], **lora_options))
    randomize_adapter(model)  # B nonzero: both factors receive gradients
    return model.train()


def prepare(model: nn.Module, tile: int | None, checkpointing: str | None) -> nn.Module:
    if tile is not None:
        enable_tiled_mlp(model, tile)
    if checkpointing is not None:
        enable_activation_checkpointing(model, offload=checkpointing == "offload")
    return model


def loss_and_gradients(model: nn.Module, seed: int = 0, length: int = LENGTH):
    ids = input_ids(seed=1, batch=BATCH, length=length)
    torch.manual_seed(seed)  # the dropout masks
    loss = CausalLMObjective(model)(ids, ids.roll(-1, dims=1))
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def assert_same_step(tiled, untiled, tolerance: float = 1e-5) -> None:
    (loss, gradients), (untiled_loss, untiled_gradients) = tiled, untiled
    torch.testing.assert_close(loss, untiled_loss, rtol=1e-6, atol=0)
    assert gradients.keys() == untiled_gradients.keys() and any("mlp" in name for name in gradients)
    for name, gradient in gradients.items():
        # Tiles change the matmul shapes, so float32 sums may be reassociated (~1e-7 of the norm); anything wrong or
        # missing is off by far more.
        reference = untiled_gradients[name]
        assert reference.abs().sum() > 0, name
        relative_error = (gradient - reference).norm() / reference.norm()
        assert relative_error <= tolerance, (name, relative_error)


def record_tile_sizes(model: nn.Module) -> list[int]:
    """The token counts the MLPs' own forward is called with, from now on."""
    sizes: list[int] = []
    for block in model.blocks:
        tiled = block.mlp.forward
        original = tiled.forward

        def spy(x, original=original):
            sizes.append(x.shape[:-1].numel())
            return original(x)

        tiled.forward = spy
    return sizes


# ---------------------------------------------------------------- same loss and gradients


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma2", "phi3", "gpt_neox"])
@pytest.mark.parametrize("checkpointing", [None, "recompute", "offload"])
def test_tiled_mlp_trains_like_the_untiled_one(family_checkpoints, family, checkpointing):
    checkpoint_dir = family_checkpoints[family]
    untiled = loss_and_gradients(prepare(lora_model(checkpoint_dir), None, checkpointing))
    model = prepare(lora_model(checkpoint_dir), TILE, checkpointing)
    keys = list(model.state_dict())
    sizes = record_tile_sizes(model)
    assert_same_step(loss_and_gradients(model), untiled)
    assert list(model.state_dict()) == keys  # checkpoints and adapters keep their names
    assert max(sizes) == TILE and set(sizes) == {TILE, BATCH * LENGTH % TILE}  # really ran tile by tile


def test_tiled_mlp_over_a_quantized_base(tiny_llama_dir):
    untiled = loss_and_gradients(prepare(lora_model(tiny_llama_dir, "bnb.nf4"), None, "offload"))
    assert_same_step(loss_and_gradients(prepare(lora_model(tiny_llama_dir, "bnb.nf4"), TILE, "offload")), untiled)


@pytest.mark.parametrize("checkpointing", [None, "recompute", "offload"])
def test_dropout_masks_are_replayed_when_tiles_are_recomputed(tiny_llama_dir, checkpointing, monkeypatch):
    """With LoRA dropout, tiles draw their masks tile by tile (other masks than an untiled run from the same seed),
    so the reference is the tiled forward kept whole by autograd: no checkpoint, nothing recomputed. A
    recomputation that drew new masks would give gradients of another forward than the one whose loss was taken."""
    with monkeypatch.context() as patch:
        patch.setattr(tiling, "checkpoint", lambda function, *args, use_reentrant: function(*args))
        kept = loss_and_gradients(prepare(lora_model(tiny_llama_dir, dropout=0.3), TILE, None), seed=3)
    recomputed = loss_and_gradients(prepare(lora_model(tiny_llama_dir, dropout=0.3), TILE, checkpointing), seed=3)
    assert_same_step(recomputed, kept, tolerance=1e-6)
    # The masks matter: another seed gives another loss, so the equality above is not that of dropout-free runs.
    other_seed = loss_and_gradients(prepare(lora_model(tiny_llama_dir, dropout=0.3), TILE, checkpointing), seed=4)
    assert not torch.allclose(other_seed[0], kept[0])


def test_sequences_within_one_tile_run_the_mlp_untouched(tiny_llama_dir, monkeypatch):
    def refuse(*args):
        raise AssertionError("tiled a sequence that fits in one tile")

    monkeypatch.setattr(tiling, "run_in_tiles", refuse)
    untiled = loss_and_gradients(lora_model(tiny_llama_dir))
    assert_same_step(loss_and_gradients(prepare(lora_model(tiny_llama_dir), BATCH * LENGTH, None)), untiled, 0)


def test_tile_size_is_validated_and_can_change(tiny_llama_dir):
    model = lora_model(tiny_llama_dir)
    for bad in (0, -4, 2.5, True, None):
        with pytest.raises(ConfigError, match=r"^--train.mlp_tile_tokens .*: must be a whole number of tokens"):
            enable_tiled_mlp(model, bad)
    enable_tiled_mlp(model, 16)
    enable_tiled_mlp(model, TILE)  # changes the tile size, does not tile inside tiles
    sizes = record_tile_sizes(model)
    loss_and_gradients(model)
    assert max(sizes) == TILE


# ---------------------------------------------------------------- memory

WIDE = {  # an MLP 16 times as wide as the model, as in llama-8b (3.5x): its intermediates dominate
    "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
}
LONG, LONG_TILE = 2048, 256


def wide_lora_model(tile: int | None, checkpointing: str | None) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(WIDE)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["all-linear"]))
    return prepare(model.train(), tile, checkpointing)


def saved_for_backward_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages autograd keeps from the forward for the backward (views counted once)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.randint(0, WIDE["vocab_size"], (1, LONG), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.hidden_states(ids)
    return sum(storages.values())


class PeakMemory(TorchDispatchMode):
    """The most bytes that tensors made by operators held at once (parameters and inputs not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                self.live.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return output


def peak_step_bytes(model: nn.Module) -> int:
    ids = torch.randint(0, WIDE["vocab_size"], (1, LONG), generator=torch.Generator().manual_seed(0))
    with PeakMemory() as memory:
        model.hidden_states(ids).pow(2).mean().backward()
    return memory.peak


def test_tiled_mlp_keeps_one_tile_of_intermediates_for_the_backward():
    untiled, tiled = (saved_for_backward_bytes(wide_lora_model(tile, None)) for tile in (None, LONG_TILE))
    intermediate = LONG * WIDE["intermediate_size"] * 4  # one float32 (tokens x intermediate_size) tensor
    # Untiled, each block keeps gate and up (the LoRA down projection's operator, `lora_gated_down`, keeps no
    # silu(gate) or product); tiled, none of them.
    assert untiled - tiled >= 2 * 2 * intermediate, (untiled, tiled)
    assert tiled < 0.25 * untiled, (untiled, tiled)


@pytest.mark.parametrize("checkpointing", ["recompute", "offload"])
def test_tiled_mlp_lowers_the_peak_of_a_checkpointed_step(checkpointing):
    """With activation checkpointing the peak is the recomputed block's backward, the MLP's intermediates and
    their gradients: tiled, one tile's worth of them."""
    untiled, tiled = (peak_step_bytes(wide_lora_model(tile, checkpointing)) for tile in (None, LONG_TILE))
    intermediate = LONG * WIDE["intermediate_size"] * 4
    assert untiled - tiled >= 3 * intermediate, (untiled, tiled)
    assert tiled < 0.4 * untiled, (untiled, tiled)


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("checkpointing", [None, "offload"])
def test_compiled_blocks_with_tiled_mlp_train_like_eager(tiny_llama_dir, checkpointing):
    """The tile loop runs eagerly between the compiled parts of the block (traced, its number of tiles would make
    every other sequence length compile the block again)."""
    from torch._dynamo.utils import counters

    eager = prepare(lora_model(tiny_llama_dir), None, None)
    compiled = prepare(lora_model(tiny_llama_dir), TILE, checkpointing)
    keys = list(compiled.state_dict())
    compile_blocks(compiled, "torch")
    assert list(compiled.state_dict()) == keys
    graphs_before = counters["stats"]["unique_graphs"]
    sizes = record_tile_sizes(compiled)
    assert_same_step(loss_and_gradients(compiled), loss_and_gradients(eager))
    assert counters["stats"]["unique_graphs"] > graphs_before  # the blocks really ran compiled
    assert max(sizes) == TILE  # and the MLP tile by tile
