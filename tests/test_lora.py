"""LoRA / rsLoRA / DoRA layers against PEFT (the reference): logits and adapter gradients on the same weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from litft.adapters.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    merge_lora_,
    resolve_targets,
    set_compute_together,
)
from litft.checkpoint import load_model
from litft.errors import ConfigError

PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------- helpers shared with the other adapter tests


def input_ids(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_model(checkpoint_dir) -> nn.Module:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()


def peft_model(checkpoint_dir, seed: int = 0, **lora_kwargs) -> nn.Module:
    """transformers' model wrapped by PEFT, with every adapter tensor random (B nonzero, DoRA magnitude moved)."""
    import peft

    model = peft.get_peft_model(hf_model(checkpoint_dir), peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.2 * torch.randn(parameter.shape, generator=generator))
            elif "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def peft_adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's adapter state under litft names (PEFT's saved keys without the `base_model.model.` prefix)."""
    from peft import get_peft_model_state_dict

    return {
        key.removeprefix(PEFT_PREFIX): value
        for key, value in get_peft_model_state_dict(model, save_embedding_layers=False).items()
    }


def randomize_adapter(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in adapter_state_dict(model).items():
            noise = torch.randn(tensor.shape, generator=generator).to(tensor.device)
            tensor.copy_(tensor * (1 + 0.2 * noise) if name.endswith("magnitude_vector") else noise * 0.05)


def litft_lora_model(checkpoint_dir, config: LoRAConfig) -> nn.Module:
    model = load_model(checkpoint_dir, dtype=torch.float32)
    apply_lora(model, config)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- tests

CASES = {
    "lora": ({"targets": ["q", "v"]}, {"target_modules": ["q_proj", "v_proj"]}),
    "rslora": (
        {"targets": ["q", "k", "v", "o", "lm_head"], "rslora": True},
        {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"], "use_rslora": True},
    ),
    "dora-all-linear": ({"targets": ["all-linear"], "dora": True}, {"target_modules": "all-linear", "use_dora": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_gradients_match_peft(tiny_llama_dir, case):
    ours_kwargs, peft_kwargs = CASES[case]
    reference = peft_model(tiny_llama_dir, r=4, lora_alpha=12, **peft_kwargs)
    ours = litft_lora_model(tiny_llama_dir, LoRAConfig(rank=4, alpha=12, **ours_kwargs))
    reference_tensors = peft_adapter_tensors(reference)
    assert sorted(adapter_state_dict(ours)) == sorted(reference_tensors)
    with torch.no_grad():
        for name, tensor in adapter_state_dict(ours).items():
            tensor.copy_(reference_tensors[name])

    ids = input_ids()
    weights = torch.randn(2, 12, 512, generator=torch.Generator().manual_seed(1))
    reference_logits = reference(input_ids=ids).logits
    our_logits = ours(ids)
    # Same math, other association order (scaling on the rank-sized intermediate, the add fused into a GEMM):
    # float32 rounding differs at the 1e-5 level on logits of this size.
    torch.testing.assert_close(our_logits, reference_logits, atol=1e-4, rtol=1e-4)

    (reference_logits * weights).sum().backward()
    (our_logits * weights).sum().backward()
    reference_grads = {
        n.removeprefix(PEFT_PREFIX).replace(".default", "").replace("vector.weight", "vector"): p.grad
        for n, p in reference.named_parameters()
        if p.requires_grad
    }
    our_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(our_grads) == sorted(reference_grads)
    for name, grad in our_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        # Relative to the gradient's norm: its entries span orders of magnitude, float32 reassociation does not.
        # 2e-5: CPUs differ in how their kernels associate the sums (1.1e-5 seen on an AVX2-only machine, rsLoRA).
        relative_error = (grad - reference_grads[name]).norm() / reference_grads[name].norm()
        assert relative_error < 2e-5, (name, relative_error)


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_in_training_matches_peft(tiny_llama_dir, dora):
    # Layers computed one by one draw one mask per adapted layer from the global generator, in PEFT's order, so equal
    # seeds give equal masks. (Computed together they draw their masks from a seed of their own: checked against
    # this path given the same masks in tests/test_lora_projections.py.)
    reference = peft_model(
        tiny_llama_dir, r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"], use_dora=dora
    ).train()
    ours = litft_lora_model(tiny_llama_dir, LoRAConfig(rank=4, alpha=8, dropout=0.3, targets=["q", "v"], dora=dora))
    ours.train()
    set_compute_together(ours, False)
    with torch.no_grad():
        for name, tensor in adapter_state_dict(ours).items():
            tensor.copy_(peft_adapter_tensors(reference)[name])
    ids = input_ids()
    torch.manual_seed(5)
    reference_logits = reference(input_ids=ids).logits
    torch.manual_seed(5)
    our_logits = ours(ids)
    torch.manual_seed(6)
    other_mask_logits = ours(ids)
    torch.testing.assert_close(our_logits, reference_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(our_logits, other_mask_logits)


@pytest.mark.parametrize("dora", [False, True])
def test_fresh_adapter_equals_base_and_only_adapters_train(tiny_llama_dir, dora):
    base = load_model(tiny_llama_dir, dtype=torch.float32).eval()
    ours = litft_lora_model(tiny_llama_dir, LoRAConfig(rank=4, targets=["all-linear"], dora=dora))
    torch.testing.assert_close(ours(input_ids()), base(input_ids()), atol=0, rtol=0)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(ours))
    layer = ours.model.layers[0].self_attn.q_proj
    bound = 1 / math.sqrt(64)  # kaiming-uniform(a=sqrt(5)) over fan_in 64, as nn.Linear and PEFT initialize A
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 4
    assert torch.count_nonzero(layer.lora_B.weight) == 0


@pytest.mark.parametrize("dora", [False, True])
def test_apply_lora_before_loading_creates_adapters_as_weights_load(tiny_llama_dir, dora):
    config = LoRAConfig(rank=4, targets=["q", "down"], dora=dora)
    ours = load_model(tiny_llama_dir, dtype=torch.float32, prepare=lambda model: apply_lora(model, config)).eval()
    base = load_model(tiny_llama_dir, dtype=torch.float32).eval()
    adapters = adapter_state_dict(ours)
    assert len(adapters) == 2 * 2 * (3 if dora else 2)
    assert all(not t.is_meta and t.dtype == torch.float32 for t in adapters.values())
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == set(adapters)
    down = ours.model.layers[1].mlp.down_proj
    assert isinstance(down, LoRALinear)
    torch.testing.assert_close(down.weight, base.model.layers[1].mlp.down_proj.weight, atol=0, rtol=0)
    if dora:
        torch.testing.assert_close(down.lora_magnitude_vector, base.model.layers[1].mlp.down_proj.weight.norm(dim=1))
    torch.testing.assert_close(ours(input_ids()), base(input_ids()), atol=0, rtol=0)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_lora_folds_the_adapter_into_plain_linears(tiny_llama_dir, dora):
    ours = litft_lora_model(tiny_llama_dir, LoRAConfig(rank=4, targets=["all-linear", "lm_head"], dora=dora))
    randomize_adapter(ours)
    adapted = ours(input_ids())
    merge_lora_(ours)
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())
    assert type(ours.lm_head) is nn.Linear and ours.lm_head.weight.dtype == torch.float32
    torch.testing.assert_close(ours(input_ids()), adapted, atol=1e-5, rtol=1e-5)


def test_target_names_map_to_modules(tiny_llama_dir):
    model = load_model(tiny_llama_dir, dtype=torch.float32)
    replaced = apply_lora(model, LoRAConfig(targets=["all-linear"]))
    assert len(replaced) == 2 * 7 and "lm_head" not in replaced
    model = load_model(tiny_llama_dir, dtype=torch.float32)
    replaced = apply_lora(model, LoRAConfig(targets=["gate", "mlp.up_proj", "lm_head"]))
    assert replaced == [f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("gate_proj", "up_proj")] + ["lm_head"]


@pytest.mark.parametrize(
    "config, flag",
    [
        (LoRAConfig(targets=["qkv"]), "--lora.targets 'qkv'"),
        (LoRAConfig(rank=0), "--lora.rank"),
        (LoRAConfig(dropout=1.0), "--lora.dropout"),
        (LoRAConfig(alpha=0), "--lora.alpha"),
    ],
)
def test_bad_lora_settings_name_the_flag(tiny_llama_dir, config, flag):
    model = load_model(tiny_llama_dir, dtype=torch.float32)
    with pytest.raises(ConfigError, match=flag):
        apply_lora(model, config)


@pytest.mark.parametrize(
    "family, targets, peft_targets, head",
    [
        ("phi3", ["q", "up", "o"], ["qkv_proj", "gate_up_proj", "o_proj"], "lm_head"),
        (
            "gpt_neox",
            ["v", "o", "up", "down"],
            ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
            "embed_out",
        ),
        ("gemma", ["all-linear"], "all-linear", "lm_head"),
    ],
)
def test_short_targets_hit_each_familys_modules_as_peft_does(tmp_path, family, targets, peft_targets, head):
    from model_zoo import FAMILY_BUILDERS

    checkpoint_dir = FAMILY_BUILDERS[family](tmp_path)
    reference = peft_model(checkpoint_dir, r=4, lora_alpha=8, target_modules=peft_targets, use_dora=True)
    ours = litft_lora_model(checkpoint_dir, LoRAConfig(rank=4, alpha=8, targets=targets, dora=True))
    reference_tensors = peft_adapter_tensors(reference)
    assert sorted(adapter_state_dict(ours)) == sorted(reference_tensors)
    with torch.no_grad():
        for name, tensor in adapter_state_dict(ours).items():
            tensor.copy_(reference_tensors[name])
        torch.testing.assert_close(ours(input_ids()), reference(input_ids=input_ids()).logits, atol=1e-5, rtol=1e-5)
    assert resolve_targets(load_model(checkpoint_dir, dtype=torch.float32), ["lm_head"]) == [head]
