"""Adapters in PEFT's format: ours load in PEFT, PEFT's load in litft, both reproducing the other's logits."""

from __future__ import annotations

import json

import pytest
import torch
from test_lora import hf_model, input_ids, litft_lora_model, peft_model, randomize_adapter

from litft.adapters.lora import LoRAConfig, adapter_state_dict
from litft.adapters.peft_format import load_peft_adapter, save_peft_adapter
from litft.checkpoint import load_model
from litft.errors import CheckpointError


@pytest.mark.parametrize(
    "config, target_modules",
    [
        (LoRAConfig(rank=4, alpha=8, targets=["q", "v", "lm_head"], rslora=True), ["lm_head", "q_proj", "v_proj"]),
        (
            LoRAConfig(rank=2, alpha=4, dropout=0.1, targets=["all-linear"], dora=True),
            ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
        ),
        (LoRAConfig(rank=4, targets=["layers.1.self_attn.q_proj"]), ["model.layers.1.self_attn.q_proj"]),
    ],
)
def test_saved_adapter_loads_in_peft_with_the_same_logits(tiny_llama_dir, tmp_path, config, target_modules):
    from peft import PeftModel

    ours = litft_lora_model(tiny_llama_dir, config)
    randomize_adapter(ours)
    save_peft_adapter(ours, config, tmp_path / "adapter", base_model_name_or_path=str(tiny_llama_dir))

    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM"
    assert (written["r"], written["lora_alpha"], written["lora_dropout"]) == (config.rank, config.alpha, config.dropout)
    assert (written["use_rslora"], written["use_dora"]) == (config.rslora, config.dora)
    assert written["target_modules"] == target_modules
    assert written["base_model_name_or_path"] == str(tiny_llama_dir)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    reference = PeftModel.from_pretrained(hf_model(tiny_llama_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=input_ids()).logits, ours(input_ids()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "peft_kwargs",
    [
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "down_proj"]},
        {"r": 4, "lora_alpha": 16, "target_modules": "all-linear", "use_dora": True, "use_rslora": True},
        {"r": 2, "lora_alpha": 2, "target_modules": r".*\.1\.self_attn\.(q|o)_proj"},
    ],
)
def test_adapter_saved_by_peft_loads_with_the_same_logits(tiny_llama_dir, tmp_path, peft_kwargs):
    reference = peft_model(tiny_llama_dir, **peft_kwargs)
    reference.save_pretrained(tmp_path / "peft_adapter")
    ours = load_model(tiny_llama_dir, dtype=torch.float32).eval()
    config = load_peft_adapter(ours, tmp_path / "peft_adapter")
    assert (config.rank, config.alpha, config.dora) == (
        peft_kwargs["r"],
        peft_kwargs["lora_alpha"],
        peft_kwargs.get("use_dora", False),
    )
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids()), reference(input_ids=input_ids()).logits, atol=1e-5, rtol=1e-5)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == set(adapter_state_dict(ours))


def _write_adapter(tmp_path, tiny_llama_dir, **changes):
    ours = litft_lora_model(tiny_llama_dir, LoRAConfig(rank=4, targets=["q"]))
    save_peft_adapter(ours, LoRAConfig(rank=4, targets=["q"]), tmp_path / "adapter", "base")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))
    return tmp_path / "adapter"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"bias": "all"}, r"field 'bias' = 'all' is not supported"),
        ({"peft_type": "IA3"}, r"peft_type is 'IA3'; litft loads LORA adapters only"),
        ({"target_modules": ["query_key_value"]}, r"target_modules \['query_key_value'\] match no linear layer"),
        (
            {"r": 8},
            (
                r"'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has shape \(4, 64\), "
                r"the model needs \(8, 64\)"
            ),
        ),
        ({"target_modules": ["q_proj", "v_proj"]}, r"adapter tensors missing: model.layers.0.self_attn.v_proj"),
    ],
)
def test_adapter_that_does_not_fit_is_refused_in_one_line(tiny_llama_dir, tmp_path, changes, message):
    adapter = _write_adapter(tmp_path, tiny_llama_dir, **changes)
    with pytest.raises(CheckpointError, match=message) as error:
        load_peft_adapter(load_model(tiny_llama_dir, dtype=torch.float32), adapter)
    assert "\n" not in str(error.value)


def test_missing_adapter_files_are_named(tiny_llama_dir, tmp_path):
    model = load_model(tiny_llama_dir, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="no such folder"):
        load_peft_adapter(model, tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_peft_adapter(model, tmp_path)
    adapter = _write_adapter(tmp_path, tiny_llama_dir)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors .*convert it to safetensors"):
        load_peft_adapter(load_model(tiny_llama_dir, dtype=torch.float32), adapter)
