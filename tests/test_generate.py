"""Generation: the CLI reproduces the stories260K greedy reference, greedy ids equal transformers' `generate` for
every model family (batched with left padding), LoRA adapters match peft, and bad input is one line."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from litft.checkpoint import load_model
from litft.cli import main
from litft.errors import CheckpointError
from litft.generation import generate, sample_next
from model_zoo import FAMILY_BUILDERS

REFERENCE = Path(__file__).parent / "data" / "models" / "stories260K.greedy_reference.json"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        main(list(args))
        code = 0
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_reproduces_greedy_reference_batched_and_streamed(capsys, stories_dir):
    reference = json.loads(REFERENCE.read_text())
    # The reference was made without a stop token; none of its ids is one of the checkpoint's stop ids (2, 1).
    assert not any({1, 2} & set(r["greedy_new_ids"]) for r in reference.values())
    prompts = list(reference)
    code, out, _ = run_cli(
        capsys, "generate", "--checkpoint", str(stories_dir), "--prompt", json.dumps(prompts),
        "--max_new_tokens", "64", "--output_format", "json",
    )
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == prompts
    for record in records:
        expected = reference[record["prompt"]]
        assert record["token_ids"] == expected["greedy_new_ids"]
        assert record["text"] == expected["greedy_text"]
        assert record["finish_reason"] == "length"
    # A single prompt streams: stdout is exactly the continuation.
    code, out, err = run_cli(
        capsys, "generate", "--checkpoint", str(stories_dir), "--prompt", "Once upon a time", "--max_new_tokens", "64"
    )
    assert code == 0 and out == reference["Once upon a time"]["greedy_text"] + "\n"
    assert "tokens/s" in err


@pytest.fixture(scope="module")
def stories_model(stories_dir):
    return load_model(stories_dir, dtype=torch.float32)


def test_stop_ids_end_a_row_and_sampling_controls(stories_model):
    reference = json.loads(REFERENCE.read_text())["Once upon a time"]
    prompt, greedy = reference["prompt_ids"], reference["greedy_new_ids"]
    stop = greedy[10]
    first = greedy.index(stop)
    result = generate(stories_model, [prompt], 64, [stop])[0]
    assert (result.token_ids, result.finish_reason) == (greedy[:first], "eos")
    # top_k=1 and a tiny top_p leave only the most likely token: sampling becomes greedy.
    for options in ({"top_k": 1}, {"top_p": 1e-6}):
        sampled = generate(stories_model, [prompt], 12, [], temperature=1.0, **options)[0]
        assert sampled.token_ids == greedy[:12]
    # Same seed, same sample; another seed, another sample.
    runs = [
        generate(stories_model, [prompt], 12, [], temperature=1.0, generator=torch.Generator().manual_seed(seed))[0]
        for seed in (0, 0, 1)
    ]
    assert runs[0].token_ids == runs[1].token_ids != runs[2].token_ids


def test_top_p_and_top_k_sample_only_inside_their_sets():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = lambda **kw: {int(sample_next(logits, 1.0, generator=generator, **kw)) for _ in range(300)}  # noqa: E731
    assert draws(top_p=0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert draws(top_p=0.81) == {0, 1, 2}
    assert draws(top_k=3) == {0, 1, 2}


@pytest.mark.parametrize("family", list(FAMILY_BUILDERS))
def test_greedy_ids_match_transformers_generate_with_left_padding(family, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = FAMILY_BUILDERS[family](tmp_path)
    try:
        ours = load_model(folder, dtype=torch.float32)
    except CheckpointError as error:
        pytest.skip(f"{family} is not supported by litft.models yet: {error}")
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=generator).tolist() for n in (5, 12, 1)]
    new_tokens, eos, pad = 32, 2, 0
    results = generate(ours, prompts, new_tokens, [eos], pad_id=pad)

    longest = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    output = theirs.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=new_tokens,
        eos_token_id=eos, pad_token_id=pad,
    )[:, longest:].tolist()
    for result, expected in zip(results, output):
        stopped = eos in expected
        expected = expected[: expected.index(eos)] if stopped else expected
        assert result.token_ids == expected
        assert result.finish_reason == ("eos" if stopped else "length")
    # The most padded row computes exactly what it computes alone: padding is invisible.
    assert generate(ours, [prompts[-1]], new_tokens, [eos])[0].token_ids == results[-1].token_ids


@pytest.fixture(scope="module")
def peft_adapter(tiny_llama_dir, tmp_path_factory):
    """A PEFT LoRA adapter with random (non-zero) weights on the tiny Llama, and peft's greedy ids for it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    prompt = [1, 403, 407, 261, 378]
    expected = model.generate(
        input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=24, eos_token_id=2, pad_token_id=0
    )[0, len(prompt):].tolist()
    return folder, expected[: expected.index(2)] if 2 in expected else expected


def test_adapter_on_base_and_finetuned_output_match_peft(capsys, tiny_llama_dir, peft_adapter, tmp_path):
    pytest.importorskip("litft.adapters.peft_format")
    adapter, expected = peft_adapter
    args = ["--prompt", "Once upon a time", "--max_new_tokens", "24", "--output_format", "json"]
    code, out, err = run_cli(capsys, "generate", "--checkpoint", str(tiny_llama_dir), "--adapter", str(adapter), *args)
    assert code == 0, err
    assert json.loads(out)["token_ids"] == expected
    # A litft fine-tuned output: the adapter plus litft_run.json naming its base; the base loads automatically.
    final = tmp_path / "final"
    shutil.copytree(adapter, final)
    (final / "litft_run.json").write_text(json.dumps({"base_checkpoint": str(tiny_llama_dir)}))
    code, out, err = run_cli(capsys, "generate", "--checkpoint", str(final), *args)
    assert code == 0, err
    assert json.loads(out)["token_ids"] == expected
    assert str(final) in err  # the diagnostics say which adapter was applied


def test_chat_loop_is_multi_turn_with_reset(capsys, monkeypatch, stories_dir):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/reset\nHello\nHow are you?\n"))
    code, out, err = run_cli(
        capsys, "chat", "--checkpoint", str(stories_dir), "--temperature", "0", "--max_new_tokens", "8"
    )
    assert code == 0
    replies = out.splitlines()
    assert len(replies) == 3 and replies[0]
    assert replies[0] == replies[1]  # after /reset the same message gets the same greedy reply
    assert "new conversation" in err and "plain" in err


def bad_checkpoints(root: Path, stories_dir: Path) -> dict[str, Path]:
    no_weights = root / "no_weights"
    no_weights.mkdir()
    shutil.copy(stories_dir / "config.json", no_weights / "config.json")
    shutil.copy(stories_dir / "tokenizer.json", no_weights / "tokenizer.json")
    no_tokenizer = root / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(stories_dir / name, no_tokenizer / name)
    return {"no such folder": root / "missing", "no weights": no_weights, "no tokenizer": no_tokenizer}


def test_bad_input_is_one_clear_line(capsys, stories_dir, tmp_path):
    cases = [(["--checkpoint", str(folder)], message) for message, folder in bad_checkpoints(tmp_path, stories_dir).items()]
    cases += [
        (["--checkpoint", str(stories_dir), "--top_p", value], "--top_p") for value in ("0", "1.5")
    ]
    cases += [
        (["--checkpoint", str(stories_dir), "--max_new_tokens", "-1"], "--max_new_tokens"),
        (["--checkpoint", str(stories_dir), "--precision", "int3"], "--precision"),
        (["--checkpoint", str(stories_dir), "--system", "Be brief"], "--system"),
        (["--checkpoint", str(stories_dir), "--chat", "true", "--chat_template", "vicuna"], "--chat_template"),
        (["--checkpoint", str(stories_dir), "--chat_template", "chatml"], "--chat_template chatml only applies"),
    ]
    for args, message in cases:
        code, out, err = run_cli(capsys, "generate", *args, "--prompt", "Hi")
        assert code != 0, args
        assert out == ""
        lines = err.strip().splitlines()
        assert lines[-1].startswith("litft: error:") and message in lines[-1], (args, err)
        assert "Traceback" not in err
        if "--chat_template" in args:  # refused before the model loads, not after
            assert "Loaded" not in err, err


def test_an_empty_prompt_list_is_refused_and_a_prompt_past_the_context_noted(capsys, stories_dir):
    code, out, err = run_cli(capsys, "generate", "--checkpoint", str(stories_dir), "--prompt", "[]")
    assert code != 0 and err.strip().splitlines() == ["litft: error: --prompt []: the list holds no prompt; give at "
                                                       "least one"]
    long_prompt = "Once upon a time " * 150  # ~600 tokens; stories260K was trained for 512 positions
    code, out, err = run_cli(capsys, "generate", "--checkpoint", str(stories_dir), "--prompt", long_prompt,
                             "--max_new_tokens", "2", "--top_k", "5")
    assert code == 0
    assert "past the 512 positions of the checkpoint's max_position_embeddings" in err
    assert "note: --top_k and --top_p apply when sampling" in err
    code, out, err = run_cli(capsys, "generate", "--checkpoint", str(stories_dir), "--prompt", "Hi",
                             "--max_new_tokens", "2")
    assert code == 0 and "warning" not in err and "note" not in err
