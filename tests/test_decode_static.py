"""The static-shape decoding step (litft.generation.DecodeStep over a static KV cache) computes what the dynamic
cache computes, for every family, with left padding and past the sliding window; generation on it keeps the ids
(greedy and seeded sampling) of the per-step dynamic loop; on a GPU, CUDA-graph replay gives the eager ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_zoo import FAMILY_BUILDERS, SLIDING_WINDOW

from litft.checkpoint import load_model
from litft.generation import DecodeStep, generate, sample_next

# One of each kind of attention for the GPU test: plain, sliding, soft-capped, mixed rope bases, longrope, NeoX.
GRAPH_FAMILIES = ["llama", "mistral-sliding", "gemma2", "gemma3", "phi4mini-partial-rotary", "gpt_neox"]
PROMPT_LENGTHS = (12, 7)  # row 1 is left-padded by 5
STEPS = 24  # 12 + 24 slots: past the sliding window (8) and past Phi-4-mini's original context (32)
assert PROMPT_LENGTHS[0] + STEPS > 32 > SLIDING_WINDOW


@pytest.fixture(scope="module")
def checkpoints(family_checkpoints) -> dict[str, Path]:
    return family_checkpoints


def padded_batch(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens (2, 12 + STEPS), and the prompts' document ids and positions (2, 12) with row 1 left-padded."""
    tokens = torch.randint(3, 512, (2, PROMPT_LENGTHS[0] + STEPS), generator=torch.Generator().manual_seed(0))
    document_ids = torch.ones(2, PROMPT_LENGTHS[0], dtype=torch.long)
    document_ids[1, : PROMPT_LENGTHS[0] - PROMPT_LENGTHS[1]] = 0
    position_ids = (document_ids.cumsum(-1) - 1).clamp(min=0)
    return tokens.to(device), document_ids.to(device), position_ids.to(device)


@pytest.mark.parametrize("family", list(FAMILY_BUILDERS))
@torch.inference_mode()
def test_static_cache_equals_dynamic_cache(family, checkpoints):
    """Teacher-forced: a static prefill and static decoding steps give the dynamic cache's logits at every step.
    The static cache is larger than needed, so never-filled slots sit in every mask too."""
    model = load_model(checkpoints[family])
    tokens, document_ids, position_ids = padded_batch()
    prompt = tokens[:, : PROMPT_LENGTHS[0]]
    dynamic = model.make_kv_cache(2, tokens.shape[1], "cpu", torch.float32)
    static = model.make_kv_cache(2, tokens.shape[1] + 5, "cpu", torch.float32)
    static.make_static()
    torch.testing.assert_close(
        model(prompt, position_ids, document_ids, static), model(prompt, position_ids, document_ids, dynamic)
    )
    step = DecodeStep(model, static, position_ids[:, -1:] + 1, use_cuda_graph=False)
    for i in range(PROMPT_LENGTHS[0], tokens.shape[1]):
        expected = model(tokens[:, i : i + 1], position_ids[:, -1:] + i - PROMPT_LENGTHS[0] + 1, kv_cache=dynamic)
        torch.testing.assert_close(step(tokens[:, i]), expected[:, -1], atol=1e-5, rtol=1e-5, msg=f"slot {i}")
    assert static.cache_position.tolist() == [tokens.shape[1]] and static.length == 0


@torch.inference_mode()
def test_static_cache_default_positions_count_from_the_cache(checkpoints):
    model = load_model(checkpoints["llama"])
    tokens = padded_batch()[0][:1, :10]
    static = model.make_kv_cache(1, 10, "cpu", torch.float32)
    static.make_static()
    logits = torch.cat([model(tokens[:, :6], kv_cache=static), model(tokens[:, 6:], kv_cache=static)], dim=1)
    torch.testing.assert_close(logits, model(tokens), atol=1e-5, rtol=1e-5)


def dynamic_generate(model, prompts: list[list[int]], max_new_tokens: int, stop: int, **sampling) -> list[list[int]]:
    """The reference: the per-step dynamic-cache loop generation ran before the static step (no early exit)."""
    longest = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    document_ids = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    position_ids = (document_ids.cumsum(-1) - 1).clamp(min=0)
    cache = model.make_kv_cache(len(prompts), longest + max_new_tokens, "cpu", torch.float32)
    hidden = model.hidden_states(input_ids, position_ids, document_ids, cache)
    positions, rows = position_ids[:, -1:], [[] for _ in prompts]
    for _ in range(max_new_tokens):
        tokens = sample_next(model.logits(hidden[:, -1]), **sampling)
        positions = positions + 1
        hidden = model.hidden_states(tokens[:, None], positions, kv_cache=cache)
        for row, token in zip(rows, tokens.tolist()):
            row.append(token)
    return [row[: row.index(stop)] if stop in row else row for row in rows]


def seeded(sampling: dict) -> dict:
    """The sampling options plus, for sampled runs, a fresh generator with a fixed seed."""
    return {**sampling, "generator": torch.Generator().manual_seed(3) if sampling["temperature"] else None}


@pytest.mark.parametrize("family", ["mistral-sliding", "gemma2", "phi4mini-partial-rotary"])
@torch.inference_mode()
def test_generate_keeps_the_dynamic_loops_ids(family, checkpoints):
    """Greedy and seeded sampling (the generator is drawn from in the same order) over a left-padded batch; a
    stop id taken from the reference ends its row early while the others run on."""
    model = load_model(checkpoints[family])
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=generator).tolist() for n in (12, 3, 7)]
    for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 50, "top_p": 0.9}):
        unstopped = dynamic_generate(model, prompts, STEPS, stop=-1, **seeded(sampling))
        stop = unstopped[1][STEPS // 2]
        expected = dynamic_generate(model, prompts, STEPS, stop=stop, **seeded(sampling))
        results = generate(model, prompts, STEPS, [stop], **seeded(sampling))
        assert [r.token_ids for r in results] == expected, sampling
        assert [r.finish_reason for r in results] == ["eos" if len(e) < STEPS else "length" for e in expected]
        assert results[1].finish_reason == "eos"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", GRAPH_FAMILIES)
@torch.inference_mode()
def test_cuda_graph_replay_equals_eager(family, dtype, checkpoints):
    """Replayed steps give the eager step's logits; generation gives the eager ids, greedy and seeded sampling,
    with a stop id ending one row early."""
    model = load_model(checkpoints[family], dtype=dtype, device="cuda").eval()
    tokens, document_ids, position_ids = padded_batch("cuda")
    prompt, fed = tokens[:, : PROMPT_LENGTHS[0]], tokens[:, PROMPT_LENGTHS[0] :]
    logits = {}
    for use_cuda_graph in (False, True):
        cache = model.make_kv_cache(2, tokens.shape[1], "cuda", dtype)
        model.hidden_states(prompt, position_ids, document_ids, cache)
        step = DecodeStep(model, cache, position_ids[:, -1:] + 1, use_cuda_graph)
        logits[use_cuda_graph] = torch.stack([step(column).clone() for column in fed.unbind(1)])  # (STEPS, 2, V)
        assert (step.graph is not None) == use_cuda_graph
    torch.testing.assert_close(logits[True], logits[False])

    prompts = [prompt[0].tolist(), prompt[1, PROMPT_LENGTHS[0] - PROMPT_LENGTHS[1] :].tolist()]

    def run(use_cuda_graph: bool, stop_ids: list[int], **sampling) -> list[list[int]]:
        generator = torch.Generator("cuda").manual_seed(0)
        results = generate(model, prompts, STEPS, stop_ids, generator=generator, use_cuda_graph=use_cuda_graph,
                           **sampling)
        return [r.token_ids for r in results]

    for sampling in ({}, {"temperature": 1.0, "top_p": 0.95}):
        eager = run(False, [], **sampling)
        assert run(True, [], **sampling) == eager, sampling
        stop = eager[0][STEPS // 2]
        assert run(True, [stop], **sampling) == run(False, [stop], **sampling), sampling
