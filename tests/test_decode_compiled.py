"""The compiled decoding step (DecodeStep(compile=True), `generate(compile=True)`, `litft generate --compile`):
it computes the eager static step's logits and generation keeps plain generation's greedy ids, over a left-padded
batch; it compiles the whole step as one graph, once, not once per token; on a GPU, compiled and captured in a
CUDA graph, it replays what it computes uncaptured."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from test_decode_static import PROMPT_LENGTHS, STEPS, padded_batch
from torch._dynamo.utils import counters

from litft.checkpoint import load_model
from litft.cli import main
from litft.generation import DecodeStep, GenerationResult, generate

# generate(compile=True) rounds the cache to a power of two: 12 + 24 - 1 slots -> 64. The step tests use the same
# length, so every test of a family shares one compiled graph (compiling is what takes the time on CPU).
CACHE_LENGTH = 64


@pytest.fixture(scope="module")
def checkpoints(family_checkpoints) -> dict[str, Path]:
    return family_checkpoints


def prompts_of(tokens: torch.Tensor) -> list[list[int]]:
    """The two prompts of `padded_batch` as generate takes them: without the padding."""
    padding = PROMPT_LENGTHS[0] - PROMPT_LENGTHS[1]
    return [tokens[0, : PROMPT_LENGTHS[0]].tolist(), tokens[1, padding : PROMPT_LENGTHS[0]].tolist()]


def prefilled_step(model, tokens, document_ids, position_ids, dtype=torch.float32, **options) -> DecodeStep:
    """A decoding step over a fresh cache of CACHE_LENGTH slots, after an (eager) prefill of the prompts."""
    cache = model.make_kv_cache(2, CACHE_LENGTH, tokens.device, dtype)
    model.hidden_states(tokens[:, : PROMPT_LENGTHS[0]], position_ids, document_ids, cache)
    return DecodeStep(model, cache, position_ids[:, -1:] + 1, **options)


def compiled_graphs() -> int:
    """How many graphs dynamo has compiled in this process so far."""
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("family", ["llama", "gemma"])
@torch.inference_mode()
def test_compiled_step_equals_eager_step_and_generation(family, checkpoints):
    """Teacher-forced, the compiled step gives the eager static step's logits at every slot; greedy generation
    with it gives plain generation's ids, with a stop id ending one row early too. Gemma differs from Llama in
    what the compiler fuses: the (1 + weight) norm, the scaled embeddings, GELU, a single kv head, tied head."""
    model = load_model(checkpoints[family])
    tokens, document_ids, position_ids = padded_batch()
    eager = prefilled_step(model, tokens, document_ids, position_ids, use_cuda_graph=False)
    compiled = prefilled_step(model, tokens, document_ids, position_ids, use_cuda_graph=False, compile=True)
    for slot in range(PROMPT_LENGTHS[0], tokens.shape[1]):
        torch.testing.assert_close(
            compiled(tokens[:, slot]), eager(tokens[:, slot]), atol=1e-5, rtol=1e-5, msg=f"slot {slot}"
        )

    prompts = prompts_of(tokens)
    plain = generate(model, prompts, STEPS, [])
    assert [r.token_ids for r in generate(model, prompts, STEPS, [], compile=True)] == [r.token_ids for r in plain]
    stop = plain[1].token_ids[STEPS // 2]
    expected = [(r.token_ids, r.finish_reason) for r in generate(model, prompts, STEPS, [stop])]
    assert [(r.token_ids, r.finish_reason) for r in generate(model, prompts, STEPS, [stop], compile=True)] == expected
    assert expected[1][1] == "eos"


@torch.inference_mode()
def test_compiled_step_compiles_once_as_one_graph(checkpoints):
    """The first step compiles the whole step as a single graph (no graph breaks); no later step compiles again,
    nor a generation with another number of new tokens that rounds to the same cache length, nor one on another
    instance of the same model."""
    model = load_model(checkpoints["llama"])
    tokens, document_ids, position_ids = padded_batch()
    torch.compiler.reset()  # count from nothing, whatever compiled before this test
    before = compiled_graphs()
    step = prefilled_step(model, tokens, document_ids, position_ids, use_cuda_graph=False, compile=True)
    step(tokens[:, PROMPT_LENGTHS[0]])
    assert compiled_graphs() == before + 1
    for slot in range(PROMPT_LENGTHS[0] + 1, tokens.shape[1]):
        step(tokens[:, slot])
    assert compiled_graphs() == before + 1
    assert step.positions[:, 0].tolist() == [PROMPT_LENGTHS[0] + STEPS, PROMPT_LENGTHS[1] + STEPS]

    same_model = load_model(checkpoints["llama"])
    results = generate(same_model, prompts_of(tokens), STEPS - 2, [], compile=True)  # 12 + 22 - 1 slots -> 64
    assert [len(r.token_ids) for r in results] == [STEPS - 2] * 2
    assert compiled_graphs() == before + 1


def test_cli_compile_and_cuda_graph_reach_the_decoding_step(capsys, monkeypatch, stories_dir):
    """`litft generate --compile true` asks for the compiled step, with --cuda_graph passed along; `litft chat
    --compile true` too. (What the step then does is tested above; here only the wiring, without compiling.)"""
    calls = []

    def record(model, prompts, max_new_tokens, stop_ids, **options):
        calls.append(options)
        return [GenerationResult([], "length") for _ in prompts]

    monkeypatch.setattr("litft.generation.generate", record)
    common = ["--checkpoint", str(stories_dir), "--max_new_tokens", "4"]
    for flags in ([], ["--compile", "true"], ["--compile", "true", "--cuda_graph", "false"]):
        main(["generate", *common, "--prompt", "Once upon a time", *flags])
    assert [(c["compile"], c["use_cuda_graph"]) for c in calls] == [(False, True), (True, True), (True, False)]
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    calls.clear()
    main(["chat", *common, "--compile", "true"])
    assert [c["compile"] for c in calls] == [True]
    capsys.readouterr()


GPU_FAMILIES = ["llama", "gemma2", "phi4mini-partial-rotary"]  # plain; sliding + soft-capped; longrope


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", GPU_FAMILIES)
@torch.inference_mode()
def test_compiled_cuda_graph_equals_compiled_and_eager(family, dtype, checkpoints):
    """Compiled and replayed from a CUDA graph, the step gives exactly the compiled step's logits uncaptured (the
    same kernels), and the eager step's up to the compiler's reordering (looser in bf16, where the compiled step
    keeps some intermediates in float32); float32 generation keeps the eager ids."""
    model = load_model(checkpoints[family], dtype=dtype, device="cuda").eval()
    tokens, document_ids, position_ids = padded_batch("cuda")
    torch.compiler.reset()  # a fresh count, so the tests together stay under dynamo's recompile limit (8 graphs)
    logits = {}
    for compile, use_cuda_graph in ((False, False), (True, False), (True, True)):
        step = prefilled_step(model, tokens, document_ids, position_ids, dtype, use_cuda_graph=use_cuda_graph,
                              compile=compile)
        before = compiled_graphs()
        fed = tokens[:, PROMPT_LENGTHS[0] :].unbind(1)
        logits[compile, use_cuda_graph] = torch.stack([step(column).clone() for column in fed])  # (STEPS, 2, V)
        assert (step.graph is not None) == use_cuda_graph
        assert compiled_graphs() <= before + 1  # at most the first step compiles
    torch.testing.assert_close(logits[True, True], logits[True, False], atol=0, rtol=0)
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    torch.testing.assert_close(logits[True, True].float(), logits[False, False].float(), **tolerance)

    if dtype == torch.float32:
        prompts = prompts_of(tokens)
        eager = [r.token_ids for r in generate(model, prompts, STEPS, [], use_cuda_graph=False)]
        fast = [r.token_ids for r in generate(model, prompts, STEPS, [], use_cuda_graph=True, compile=True)]
        assert fast == eager
