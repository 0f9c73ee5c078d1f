"""Packed rows through flex_attention: the block masks built from `document_ids`, the dispatch between the flex and
dense-mask paths, and logits (and, on a GPU, gradients) equal to the dense path and to each document run alone.

On CPU torch's flex_attention runs forward only (it refuses inputs that require grad), so the CPU tests force the
flex path under torch.no_grad(); the checks of gradients, and of the default ("auto") path, are marked `gpu`."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_zoo import SLIDING_WINDOW
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from litft.checkpoint import load_model
from litft.data import IGNORE_INDEX, collate
from litft.models import common

FAMILIES = ["llama", "mistral-sliding", "gemma2", "qwen2", "gpt_neox"]
# Two packed rows of 36 tokens padded to 40, with documents longer than the sliding window (8).
CPU_ROWS = [[5, 11, 6, 14], [17, 9, 10]]
# On a GPU: rows of up to 600 tokens over several 128-token blocks, so tiles are empty, partial and full.
GPU_ROWS = [[70, 200, 33, 150, 147], [300, 5, 90, 180], [129, 128, 256]]


@pytest.fixture(scope="module")
def checkpoints(family_checkpoints) -> dict[str, Path]:
    return family_checkpoints


@functools.cache
def compiled_cpu_flex_is_sound(head_dim: int) -> bool:
    """Whether torch's compiled flex_attention is right on this CPU at this head size, judged by torch alone
    (causal, against its eager flex_attention). torch 2.13's CPU kernel is not on some CPUs: on an AVX2-only AMD EPYC
    it returned values off by up to 2.5 at head size 16 and was right at 32 and 64. litft runs flex_attention only on
    GPUs; these tests check litft's block masks, which a wrong kernel cannot."""
    from torch.nn.attention.flex_attention import flex_attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, head_dim, generator=generator) for _ in range(3))
    mask = create_block_mask(lambda b, h, q_index, kv_index: q_index >= kv_index, 1, None, 40, 40, device="cpu",
                             BLOCK_SIZE=8)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(flex_attention)(q, k, v, block_mask=mask)
        eager = flex_attention(q, k, v, block_mask=mask)
    torch._dynamo.reset()
    return torch.allclose(compiled, eager, atol=1e-5, rtol=1e-5)


def require_sound_cpu_flex(model) -> None:
    head_dim = model.config.head_dim
    if not compiled_cpu_flex_is_sound(head_dim):
        pytest.skip(f"torch's compiled flex_attention is wrong on this CPU at head size {head_dim} (torch alone "
                    "disagrees with its eager flex_attention)")


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Every test starts from empty dynamo caches: the families' flex calls would otherwise pile up entries on
    the one compiled flex_attention until dynamo gives up compiling it."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def packed_batch(rows: list[list[int]], seed: int = 0, pad_to_multiple_of: int = 8) -> dict:
    """A batch as `--data.pack true` makes it: each row a run of documents of the given lengths, positions
    restarting at each document, document ids 1, 2, ... and padding (document 0) up to the longest row."""
    generator = torch.Generator().manual_seed(seed)

    def sample(length: int) -> dict:
        tokens = torch.randint(3, 512, (length + 1,), generator=generator)
        return {"input_ids": tokens[:-1], "targets": tokens[1:]}

    return collate([[sample(n) for n in row] for row in rows], pad_id=0, pad_to_multiple_of=pad_to_multiple_of)


def document_spans(rows: list[list[int]]):
    """(row, start, end) of every document."""
    for b, row in enumerate(rows):
        start = 0
        for length in row:
            yield b, start, start + length
            start += length


def real_tokens(batch: dict) -> torch.Tensor:
    return batch["document_ids"] != 0


def forward(model, batch: dict, device: str = "cpu") -> torch.Tensor:
    return model(batch["input_ids"].to(device), batch["position_ids"].to(device), batch["document_ids"].to(device))


def mean_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    targets = batch["targets"].to(logits.device)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def block_layout(block_mask: BlockMask) -> torch.Tensor:
    """(B, H, q_blocks, kv_blocks): 0 for an empty tile, 1 partial, 2 full, whatever order the indices are in."""
    batch, heads, q_blocks = block_mask.kv_num_blocks.shape
    layout = torch.zeros(batch, heads, q_blocks, block_mask.kv_indices.shape[-1], dtype=torch.int8)
    tiles = ((block_mask.kv_num_blocks, block_mask.kv_indices, 1),
             (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, 2))
    for counts, indices, kind in tiles:
        for b in range(batch):
            for h in range(heads):
                for q in range(q_blocks):
                    layout[b, h, q, indices[b, h, q, : counts[b, h, q]].long().cpu()] = kind
    return layout


# ----------------------------------------------------------------------------------------------------------------
# Block masks and dispatch
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [8, 16, 128])
@pytest.mark.parametrize("sliding_window", [None, 5, 40])
def test_document_block_mask_matches_create_block_mask(block_size, sliding_window):
    """The banded builder classifies every tile as torch's create_block_mask does, lengths off the block grid
    included, and its mask function is the dense path's rule."""
    batch = packed_batch([[30, 70, 1, 99], [200], [3, 4, 150, 2]], pad_to_multiple_of=1)  # T = 200
    document_ids = batch["document_ids"]
    ours = common.document_block_mask(document_ids, sliding_window, block_size)
    mask_mod = common.document_mask_mod(document_ids, sliding_window)
    theirs = create_block_mask(mask_mod, 3, None, 200, 200, device="cpu", BLOCK_SIZE=block_size)
    layout = block_layout(ours)
    assert torch.equal(layout, block_layout(theirs))
    if block_size == 8 and sliding_window != 5:
        assert {0, 1, 2} <= set(layout.unique().tolist())  # the case exercises every kind of tile
    assert torch.equal(ours.q_num_blocks, theirs.q_num_blocks)
    assert torch.equal(ours.full_q_num_blocks, theirs.full_q_num_blocks)
    assert ours.seq_lengths == (200, 200)

    dense = common.build_attention_context(3, 200, torch.device("cpu"), document_ids, None, sliding_window)
    positions = torch.arange(200)
    batch_index = torch.arange(3)[:, None, None]
    for mask_mod, mask in ((common.document_mask_mod(document_ids, None), dense.mask),
                           (common.document_mask_mod(document_ids, sliding_window), dense.sliding_mask)):
        if mask is not None:
            allowed = mask_mod(batch_index, 0, positions[None, :, None], positions[None, None, :])  # (B, T, T)
            assert torch.equal(allowed, mask[:, 0])


def test_dispatch_between_flex_and_dense_paths(monkeypatch):
    document_ids = packed_batch(CPU_ROWS)["document_ids"]
    B, T = document_ids.shape
    cpu = torch.device("cpu")

    # The default: dense masks on CPU, flex on CUDA.
    assert common.FLEX_ATTENTION == "auto"
    assert not common.use_flex_attention(cpu) and common.use_flex_attention(torch.device("cuda"))
    context = common.build_attention_context(B, T, cpu, document_ids, None, SLIDING_WINDOW)
    assert context.block_mask is None and context.mask is not None and context.sliding_mask is not None

    monkeypatch.setattr(common, "FLEX_ATTENTION", "always")
    context = common.build_attention_context(B, T, cpu, document_ids, None, SLIDING_WINDOW)
    assert isinstance(context.block_mask, BlockMask) and isinstance(context.sliding_block_mask, BlockMask)
    assert context.sliding_block_mask is not context.block_mask
    assert context.mask is None and context.sliding_mask is None and context.kv_cache is None
    # A window as long as the row cuts nothing: sliding layers share the full block mask.
    context = common.build_attention_context(B, T, cpu, document_ids, None, T)
    assert context.sliding_block_mask is context.block_mask
    # Without documents (nothing packed) and with a KV cache (generation) the dense path stays.
    assert common.build_attention_context(B, T, cpu, None, None, None).block_mask is None
    cache = common.KVCache(1, B, 1, T, 4, cpu, torch.float32)
    context = common.build_attention_context(B, T, cpu, document_ids, cache, None)
    assert context.block_mask is None and context.mask is not None

    monkeypatch.setattr(common, "FLEX_ATTENTION", "never")
    assert not common.use_flex_attention(torch.device("cuda"))
    monkeypatch.setattr(common, "FLEX_ATTENTION", "sometimes")
    with pytest.raises(ValueError, match="FLEX_ATTENTION"):
        common.use_flex_attention(cpu)


def test_plain_rows_of_a_windowed_model_mask_only_the_sliding_layers():
    """Without documents or cache offsets, full layers keep SDPA's causal fast path (no mask) and sliding layers get
    the window mask; the SDPA path through both gives the explicit masks' attention."""
    B, T, window = 2, 20, SLIDING_WINDOW
    context = common.build_attention_context(B, T, torch.device("cpu"), None, None, window)
    assert context.mask is None and context.is_causal
    slots = torch.arange(T)
    expected = (slots[None, :] <= slots[:, None]) & (slots[:, None] - slots[None, :] < window)  # (T, T)
    assert context.sliding_mask.shape == (B, 1, T, T) and torch.equal(context.sliding_mask[1, 0], expected)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, heads, T, 8, generator=generator) for heads in (4, 2, 2))
    causal = slots[None, :] <= slots[:, None]
    for sliding, mask in ((False, causal), (True, expected)):
        for softcap in (None, 1.0):
            got = common.attend(q, k, v, context, sliding=sliding, softcap=softcap)
            scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 8 ** 0.5
            scores = scores if softcap is None else torch.tanh(scores / softcap) * softcap
            reference = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.repeat_interleave(2, 1)
            torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
    # A window covering every key needs no mask at all.
    assert common.build_attention_context(B, T, torch.device("cpu"), None, None, T).sliding_mask is None


def counted(monkeypatch, name: str) -> list:
    """Wraps `common.<name>` so each call appends to the returned list."""
    calls, function = [], getattr(common, name)

    def counting(*args, **kwargs):
        calls.append(name)
        return function(*args, **kwargs)

    monkeypatch.setattr(common, name, counting)
    return calls


@torch.no_grad()
def test_forced_flex_path_runs_flex_in_every_layer(checkpoints, monkeypatch):
    """The forced path really reaches flex_attention, once per layer, and never SDPA."""
    model = load_model(checkpoints["gemma2"])
    batch = packed_batch(CPU_ROWS)
    flex_calls, dense_calls = counted(monkeypatch, "flex_attend"), counted(monkeypatch, "attention")
    monkeypatch.setattr(common, "FLEX_ATTENTION", "always")
    forward(model, batch)
    assert len(flex_calls) == model.config.num_hidden_layers and not dense_calls
    monkeypatch.setattr(common, "FLEX_ATTENTION", "never")
    forward(model, batch)
    assert len(dense_calls) == model.config.num_hidden_layers and len(flex_calls) == model.config.num_hidden_layers


@pytest.mark.parametrize("family", ["gemma2", "mistral-sliding"])
@torch.no_grad()
def test_plain_rows_of_a_soft_capped_model_take_flex(family, checkpoints, monkeypatch):
    """Rows that are not packed: Gemma 2's soft-capped scores go to flex_attention (one document per row, causal
    block masks) where it runs, instead of explicit (B, heads, T, T) scores, with the same logits; a model without
    a cap (Mistral's windows alone) keeps SDPA, whose kernels take a window mask."""
    model = load_model(checkpoints[family])
    require_sound_cpu_flex(model)
    input_ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(common, "FLEX_BLOCK_SIZE", 8)
    monkeypatch.setattr(common, "FLEX_ATTENTION", "never")
    dense = model(input_ids)
    flex_calls, dense_calls = counted(monkeypatch, "flex_attend"), counted(monkeypatch, "attention")
    monkeypatch.setattr(common, "FLEX_ATTENTION", "always")
    flex = model(input_ids)
    layers = model.config.num_hidden_layers
    assert (len(flex_calls), len(dense_calls)) == ((layers, 0) if family == "gemma2" else (0, layers))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Logits on CPU (forward only: torch has no flex backward on CPU)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_flex_logits_match_dense_and_documents_alone(family, checkpoints, monkeypatch):
    model = load_model(checkpoints[family])
    require_sound_cpu_flex(model)
    batch = packed_batch(CPU_ROWS)
    # 8-token tiles: 40-token rows then hold empty, partial and full tiles, as long rows do with 128.
    monkeypatch.setattr(common, "FLEX_BLOCK_SIZE", 8)
    monkeypatch.setattr(common, "FLEX_ATTENTION", "never")
    dense = forward(model, batch)
    monkeypatch.setattr(common, "FLEX_ATTENTION", "always")
    flex = forward(model, batch)
    real = real_tokens(batch)
    torch.testing.assert_close(flex[real], dense[real], atol=1e-5, rtol=1e-5)
    for b, start, end in document_spans(CPU_ROWS):
        alone = model(batch["input_ids"][b : b + 1, start:end])[0]
        torch.testing.assert_close(flex[b, start:end], alone, atol=1e-5, rtol=1e-5, msg=f"{family}: row {b}")


@torch.no_grad()
def test_flex_inside_compiled_blocks(checkpoints, monkeypatch):
    """Every block compiled, as `--compile true` runs them: the compiled flex_attention is inlined into the
    blocks' graphs (soft-capping and sliding windows included), matches the dense path, and a batch with other
    documents of the same shape runs the same compiled code."""
    model = load_model(checkpoints["gemma2"])
    require_sound_cpu_flex(model)
    batch, other = packed_batch(CPU_ROWS, seed=0), packed_batch([[40], [1, 2, 30, 7]], seed=1)
    monkeypatch.setattr(common, "FLEX_ATTENTION", "never")
    dense, other_dense = forward(model, batch), forward(model, other)
    for block in model.blocks:
        block.compile()
    monkeypatch.setattr(common, "FLEX_ATTENTION", "always")
    flex = forward(model, batch)
    with torch._dynamo.config.patch(error_on_recompile=True):
        other_flex = forward(model, other)
    torch.testing.assert_close(flex[real_tokens(batch)], dense[real_tokens(batch)], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(other_flex[real_tokens(other)], other_dense[real_tokens(other)], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# GPU: the default path, gradients, compiled blocks, changing lengths
# ----------------------------------------------------------------------------------------------------------------


def parameter_gradients(model, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    mean_loss(forward(model, batch, "cuda"), batch).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_flex_logits_and_gradients_match_dense_on_gpu(family, checkpoints, monkeypatch):
    """float32 on CUDA, where "auto" takes the flex path: logits equal the dense path and each document alone,
    and the parameter gradients of the loss equal the dense path's."""
    model = load_model(checkpoints[family], dtype=torch.float32, device="cuda")
    batch = packed_batch(GPU_ROWS)
    assert common.use_flex_attention(torch.device("cuda"))
    real = real_tokens(batch).cuda()
    with torch.no_grad():
        flex = forward(model, batch, "cuda")
        monkeypatch.setattr(common, "FLEX_ATTENTION", "never")
        dense = forward(model, batch, "cuda")
        torch.testing.assert_close(flex[real], dense[real], atol=1e-4, rtol=1e-4)
        for b, start, end in document_spans(GPU_ROWS):
            alone = model(batch["input_ids"][b : b + 1, start:end].cuda())[0]
            torch.testing.assert_close(flex[b, start:end], alone, atol=1e-4, rtol=1e-4, msg=f"row {b}, {start}")

    dense_gradients = parameter_gradients(model, batch)
    monkeypatch.setattr(common, "FLEX_ATTENTION", "auto")
    flex_gradients = parameter_gradients(model, batch)
    assert flex_gradients.keys() == dense_gradients.keys() and flex_gradients
    for name, gradient in flex_gradients.items():
        torch.testing.assert_close(gradient, dense_gradients[name], atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("family", ["mistral-sliding", "gemma2"])
def test_flex_inside_compiled_blocks_on_gpu(family, checkpointing, checkpoints, monkeypatch):
    """Every block compiled, and optionally recomputed in the backward, as `--compile true` (with
    `--train.activation_checkpointing`) trains: flex inlined into the blocks' graphs gives the dense path's logits
    and gradients, and a batch with other documents of the same shape reuses the compiled code."""
    from litft.training.strategies import enable_activation_checkpointing

    model = load_model(checkpoints[family], dtype=torch.float32, device="cuda")
    if checkpointing:
        enable_activation_checkpointing(model)
    for block in model.blocks:
        block.compile()
    batch, other = packed_batch(GPU_ROWS, seed=0), packed_batch([[600], [1, 599], [128] * 4 + [88]], seed=1)
    real = real_tokens(batch).cuda()
    monkeypatch.setattr(common, "FLEX_ATTENTION", "never")
    with torch.no_grad():
        dense = forward(model, batch, "cuda")
    dense_gradients = parameter_gradients(model, batch)

    torch._dynamo.reset()  # the flex phase compiles from scratch, far from dynamo's recompile limit
    monkeypatch.setattr(common, "FLEX_ATTENTION", "auto")
    with torch.no_grad():
        flex = forward(model, batch, "cuda")
    flex_gradients = parameter_gradients(model, batch)
    torch.testing.assert_close(flex[real], dense[real], atol=1e-4, rtol=1e-4)
    assert flex_gradients.keys() == dense_gradients.keys()
    for name, gradient in flex_gradients.items():
        torch.testing.assert_close(gradient, dense_gradients[name], atol=1e-5, rtol=1e-3, msg=name)

    with torch._dynamo.config.patch(error_on_recompile=True):
        parameter_gradients(model, other)


@pytest.mark.gpu
def test_flex_with_changing_row_lengths_on_gpu(checkpoints, monkeypatch):
    """Training batches change length from step to step: the compiled flex_attention follows (recompiling for
    dynamic shapes) and stays equal to the dense path, below one block, across blocks and off the block grid."""
    model = load_model(checkpoints["mistral-sliding"], dtype=torch.float32, device="cuda")
    for rows in ([[5, 11, 6, 14], [17, 9, 10]], [[5, 11, 6, 14, 8], [40]], [[50, 80, 30, 100], [200, 60]],
                 [[129, 128, 256], [1, 512]], [[700], [300, 300, 90]]):
        batch = packed_batch(rows)
        monkeypatch.setattr(common, "FLEX_ATTENTION", "auto")
        with torch.no_grad():
            flex = forward(model, batch, "cuda")
            monkeypatch.setattr(common, "FLEX_ATTENTION", "never")
            dense = forward(model, batch, "cuda")
        real = real_tokens(batch).cuda()
        torch.testing.assert_close(flex[real], dense[real], atol=1e-4, rtol=1e-4, msg=f"rows {rows}")
