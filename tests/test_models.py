"""Every model family against transformers (the reference, test-only), plus the KV-cache, packed-sequence and
left-padding paths, real weights, checkpoint formats, refusals and errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from model_zoo import EXTRA_BUILDERS, FAMILY_BUILDERS

from litft.checkpoint import load_model
from litft.errors import CheckpointError

ALL_BUILDERS = {**FAMILY_BUILDERS, **EXTRA_BUILDERS}
SEQUENCE_LENGTHS = (3, 20, 40)  # 20 and 40 pass the sliding window; 40 passes Phi-4-mini's original context (32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Builds each family's tiny checkpoint once, on first use."""
    built: dict[str, Path] = {}

    class Lazy(dict):
        def __missing__(self, name: str) -> Path:
            built[name] = ALL_BUILDERS[name](tmp_path_factory.mktemp(name.replace(".", "_")))
            return built[name]

    return Lazy()


def reference_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(ALL_BUILDERS))
@torch.no_grad()
def test_logits_match_transformers(family, checkpoints):
    folder = checkpoints[family]
    ours, reference = load_model(folder), reference_model(folder)
    assert type(ours).__module__.startswith("litft.models.")
    for length in SEQUENCE_LENGTHS:
        tokens = random_tokens(2, length, seed=length)
        expected = reference(input_ids=tokens).logits
        torch.testing.assert_close(ours(tokens), expected, atol=1e-4, rtol=1e-4, msg=f"{family}, T={length}")


@pytest.mark.parametrize("family", list(FAMILY_BUILDERS))
@torch.no_grad()
def test_left_padded_batch_matches_transformers(family, checkpoints):
    """Generation's batch layout: row 1 is left-padded (document 0) and its positions start at its first real
    token. The real tokens' logits equal transformers' with the same attention mask and positions."""
    folder = checkpoints[family]
    ours, reference = load_model(folder), reference_model(folder)
    tokens = random_tokens(2, 14)
    attention_mask = torch.ones_like(tokens)
    attention_mask[1, :5] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    expected = reference(input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = ours(tokens, position_ids=position_ids, document_ids=attention_mask)
    real = attention_mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILY_BUILDERS))
@torch.no_grad()
def test_kv_cache_decode_equals_full_forward(family, checkpoints):
    """Prefill a left-padded batch, then decode token by token past the sliding window: every step's logits equal
    a full forward over each row's real tokens alone (so cached padding is never attended to)."""
    model = load_model(checkpoints[family])
    prompt_lengths, pad, steps = (12, 7), 5, 9  # 12 + 9 = 21 slots: past the window, within Phi-4-mini's 32
    tokens = random_tokens(2, prompt_lengths[0] + steps)
    document_ids = torch.ones(2, prompt_lengths[0], dtype=torch.long)
    document_ids[1, :pad] = 0
    position_ids = (document_ids.cumsum(-1) - 1).clamp(min=0)
    cache = model.make_kv_cache(2, prompt_lengths[0] + steps, "cpu", torch.float32)
    step_logits = [model(tokens[:, : prompt_lengths[0]], position_ids, document_ids, cache)[:, -1]]
    for i in range(prompt_lengths[0], prompt_lengths[0] + steps - 1):
        step_positions = position_ids[:, -1:] + (i - prompt_lengths[0] + 1)
        step_logits.append(model(tokens[:, i : i + 1], step_positions, kv_cache=cache)[:, -1])
    assert cache.length == prompt_lengths[0] + steps - 1
    for row, row_start in ((0, 0), (1, pad)):
        alone = model(tokens[row : row + 1, row_start : prompt_lengths[0] + steps - 1])[0]
        torch.testing.assert_close(torch.stack([s[row] for s in step_logits]), alone[-steps:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILY_BUILDERS))
@torch.no_grad()
def test_packed_row_equals_documents_alone(family, checkpoints):
    model = load_model(checkpoints[family])
    lengths = (5, 11, 6)  # the middle document is longer than the sliding window
    tokens = random_tokens(1, sum(lengths))
    document_ids = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)])[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = model(tokens, position_ids=position_ids, document_ids=document_ids)[0]
    for start, piece in zip(torch.tensor((0, *lengths)).cumsum(0).tolist(), torch.split(tokens, lengths, dim=1)):
        alone = model(piece)[0]
        torch.testing.assert_close(packed[start : start + piece.shape[1]], alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_stories260k_matches_transformers(stories_dir):
    from transformers import LlamaForCausalLM

    ours = load_model(stories_dir)
    reference = LlamaForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    tokens = random_tokens(2, 64)
    torch.testing.assert_close(ours(tokens), reference(input_ids=tokens).logits, atol=1e-4, rtol=1e-4)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied, as in the checkpoint


def test_rotary_tables_stay_float32_under_bf16(checkpoints):
    folder = checkpoints["gemma3"]
    model = load_model(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    position_ids = torch.arange(40)[None]
    for rotary in (model.model.rotary_emb, model.model.rotary_emb_local):
        inv_freq, _ = rotary.frequencies(position_ids)
        cos, sin = rotary(position_ids)
        assert inv_freq.dtype == cos.dtype == sin.dtype == torch.float32
    tokens = random_tokens(1, 20)
    with torch.no_grad():
        logits = model(tokens)
        full = load_model(folder)(tokens)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), full, atol=0.05, rtol=0.05)


def test_longrope_switches_to_long_factors_past_original_context(checkpoints):
    rotary = load_model(checkpoints["phi4mini-partial-rotary"]).model.rotary_emb
    short, attention_factor = rotary.frequencies(torch.arange(32)[None])
    long, _ = rotary.frequencies(torch.arange(33)[None])
    factors = torch.tensor(rotary.rope.params["long_factor"]) / torch.tensor(rotary.rope.params["short_factor"])
    torch.testing.assert_close(short / long, factors)
    assert attention_factor == pytest.approx((1 + torch.tensor(128 / 32).log() / torch.tensor(32.0).log()) ** 0.5)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint formats and refusals
# ----------------------------------------------------------------------------------------------------------------


def copy_checkpoint(source: Path, destination: Path, with_weights: bool = True) -> Path:
    import shutil

    destination.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if with_weights or not file.name.endswith((".safetensors", ".bin")):
            shutil.copy(file, destination / file.name)
    return destination


@torch.no_grad()
def test_sharded_checkpoint_loads(checkpoints, tmp_path):
    source = checkpoints["qwen2"]
    reference = reference_model(source)
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    tokens = random_tokens(1, 10)
    torch.testing.assert_close(load_model(tmp_path)(tokens), reference(input_ids=tokens).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_bin_checkpoint_loads(checkpoints, tmp_path):
    from safetensors.torch import load_file

    source = checkpoints["gpt_neox"]
    folder = copy_checkpoint(source, tmp_path / "bin", with_weights=False)
    torch.save(load_file(source / "model.safetensors"), folder / "pytorch_model.bin")
    tokens = random_tokens(1, 10)
    torch.testing.assert_close(load_model(folder)(tokens), load_model(source)(tokens))


class _WritesMarker:
    """Unpickling this would call Path.touch(marker): the attack a `.bin` checkpoint can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bin_that_would_run_code_is_refused(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["llama"], tmp_path / "evil", with_weights=False)
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _WritesMarker(marker)}, folder / "pytorch_model.bin")
    assert_one_line_error(folder, "pytorch_model.bin", "refused to unpickle")
    assert not marker.exists()
    # A bare pickle (not torch.save's zip container) is refused too, and runs nothing either.
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _WritesMarker(marker)}, handle)
    assert_one_line_error(folder, "pytorch_model.bin")
    assert not marker.exists()


def edited_checkpoint(source: Path, folder: Path, config_changes: dict | None = None) -> Path:
    copy_checkpoint(source, folder)
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def assert_one_line_error(folder: Path, *fragments: str) -> None:
    with pytest.raises(CheckpointError) as error:
        load_model(folder)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_unknown_model_type(checkpoints, tmp_path):
    folder = edited_checkpoint(checkpoints["llama"], tmp_path / "ckpt", {"model_type": "mamba9"})
    assert_one_line_error(folder, "config.json", "mamba9", "gemma2")


def test_an_activation_the_family_does_not_compute_is_refused(checkpoints, tmp_path):
    folder = edited_checkpoint(checkpoints["llama"], tmp_path / "ckpt", {"hidden_act": "gelu"})
    assert_one_line_error(folder, "config.json", "hidden_act 'gelu' is not supported")


def test_missing_weight(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = edited_checkpoint(checkpoints["gemma2"], tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.pre_feedforward_layernorm.weight"]
    save_file(state, folder / "model.safetensors")
    assert_one_line_error(folder, str(folder), "model.layers.1.pre_feedforward_layernorm.weight")


def test_shape_mismatch(checkpoints, tmp_path):
    folder = edited_checkpoint(checkpoints["phi3"], tmp_path / "ckpt", {"intermediate_size": 80})
    assert_one_line_error(folder, str(folder), "mlp.", "has shape", "the config implies")


def test_corrupt_safetensors(checkpoints, tmp_path):
    folder = edited_checkpoint(checkpoints["llama"], tmp_path / "ckpt")
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    assert_one_line_error(folder, "model.safetensors", "corrupt")


def test_missing_folder(tmp_path):
    assert_one_line_error(tmp_path / "nowhere", str(tmp_path / "nowhere"), "no such folder")


def test_a_folder_without_config_says_what_it_looks_like(tmp_path):
    """An adapter folder or a run folder given as --checkpoint: the message says which, and what to pass."""
    adapter, run, empty = tmp_path / "adapter", tmp_path / "run", tmp_path / "empty"
    for folder in (adapter, run / "final", empty):
        folder.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    assert_one_line_error(adapter, "no config.json; it is an adapter folder", "--adapter")
    assert_one_line_error(run, f"it looks like a litft run folder: its output is {run / 'final'}")
    assert_one_line_error(empty, "no config.json; a Hugging Face checkpoint folder is expected")


def test_registry_lists_every_family():
    from litft.models import supported_model_types

    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox"} <= set(
        supported_model_types()
    )


def test_legacy_non_zip_bin_checkpoint_loads(tmp_path, tiny_llama_dir):
    """`.bin` files written before torch 1.6 (no zip container) cannot be memory-mapped; they still load, and
    still only through `weights_only=True`."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "legacy"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_llama_dir / name).exists():
            shutil.copy(tiny_llama_dir / name, folder / name)
    state = load_file(tiny_llama_dir / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    model = load_model(folder, dtype=torch.float32)
    reference = load_model(tiny_llama_dir, dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids))


def test_a_config_value_of_the_wrong_type_is_one_line(checkpoints, tmp_path):
    folder = edited_checkpoint(checkpoints["llama"], tmp_path / "ckpt", {"hidden_size": "64"})
    assert_one_line_error(folder, "config.json", "cannot build a llama model from it")


@pytest.mark.parametrize("rope_scaling, message", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope type 'dynamic' is not supported"),
    ({"rope_type": "linear"}, "rope type 'linear' needs 'factor'"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "needs 'high_freq_factor'"),
])
def test_a_rope_litft_cannot_compute_is_refused_when_the_config_is_read(rope_scaling, message):
    """Before any weight loads (the model is built from the config first), not at the first forward."""
    from litft.models import build_model

    config = {
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "rope_scaling": rope_scaling,
    }
    with pytest.raises(CheckpointError, match=message):
        build_model(config)
    build_model({**config, "rope_scaling": None})  # the same config with the default rope builds


@pytest.mark.parametrize("config_dtype", [None, "auto", "bfloat16", "float32"])
def test_without_a_known_dtype_in_the_config_a_checkpoint_loads_in_its_stored_dtype(tmp_path, config_dtype):
    """config.json's dtype decides where it names one; where it is absent or "auto" the safetensors' stored dtype
    does (a bf16 checkpoint without `torch_dtype` used to load in float32, twice its memory)."""
    import json

    from transformers import AutoModelForCausalLM

    from litft.checkpoint import checkpoint_dtype, read_hf_config

    folder = FAMILY_BUILDERS["llama"](tmp_path / "float32")
    stored = tmp_path / "bfloat16"
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(stored)
    config = json.loads((stored / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    if config_dtype is not None:
        config["dtype"] = config_dtype
    (stored / "config.json").write_text(json.dumps(config))
    expected = torch.float32 if config_dtype == "float32" else torch.bfloat16
    assert checkpoint_dtype(stored, read_hf_config(stored)) == expected
    assert {p.dtype for p in load_model(stored).parameters()} == {expected}
