"""QLoRA bases on CPU: 4-bit (nf4, fp4) and int8 layers against bitsandbytes' own quantize/dequantize, weights
quantized as they load, gradients through the frozen quantized base, and merging into the unquantized base."""

from __future__ import annotations

import bitsandbytes.functional as bnb_functional
import pytest
import torch
import torch.nn.functional as F
from test_lora import input_ids, randomize_adapter
from torch import nn

from litft.adapters.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora_
from litft.adapters.merge import merge_adapter
from litft.adapters.peft_format import load_peft_adapter, save_peft_adapter
from litft.adapters.quantization import QuantizedLinear, WeightQuantization, quantize_model
from litft.checkpoint import load_model
from litft.errors import ConfigError

MODES = ["bnb.nf4", "bnb.fp4", "bnb.int8"]


def bnb_round_trip(weight: torch.Tensor, mode: str, compute_dtype: torch.dtype, double_quant: bool) -> torch.Tensor:
    """The weight as bitsandbytes itself quantizes and dequantizes it."""
    if mode == "bnb.int8":
        quantized, scale, _ = bnb_functional.int8_vectorwise_quant(weight.to(torch.float16))
        return bnb_functional.int8_vectorwise_dequant(quantized, scale).to(compute_dtype)
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=double_quant, quant_type=mode[4:], quant_storage=compute_dtype
    )
    return bnb_functional.dequantize_4bit(packed, state).to(compute_dtype)


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear) or getattr(m, "quantization", None)
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("compute_dtype, double_quant", [(torch.float32, True), (torch.bfloat16, False)])
def test_quantized_layer_equals_linear_on_the_dequantized_weight(mode, compute_dtype, double_quant):
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=True)
    x = torch.randn(3, 5, 128, dtype=compute_dtype)
    layer = QuantizedLinear(linear, WeightQuantization(mode, compute_dtype, double_quant))
    expected_weight = bnb_round_trip(linear.weight.detach(), mode, compute_dtype, double_quant)

    torch.testing.assert_close(layer.dequantized_weight(), expected_weight, atol=0, rtol=0)
    expected = F.linear(x, expected_weight, linear.bias.detach().to(compute_dtype))
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)
    # It is a real quantization: close to the weight, but not equal to it.
    error = (layer.dequantized_weight().float() - linear.weight).abs().max() / linear.weight.abs().max()
    assert 0 < error < (0.02 if mode == "bnb.int8" else 0.2)
    assert not layer.weight.requires_grad
    if mode == "bnb.int8":
        assert layer.weight.dtype == torch.int8 and layer.weight.shape == (96, 128)
    else:
        # Packed nibbles viewed as the compute dtype: two weights per byte.
        assert layer.weight.dtype == compute_dtype
        assert layer.weight.numel() * layer.weight.element_size() == 96 * 128 // 2
        assert ("weight_nested_absmax" in dict(layer.named_buffers())) == double_quant


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_the_adapter_and_the_input_through_a_quantized_base(mode):
    torch.manual_seed(0)
    layer = LoRALinear(
        QuantizedLinear(nn.Linear(64, 32), WeightQuantization(mode, torch.float32, True)),
        LoRAConfig(rank=4, alpha=8, dora=True),
    )
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.1)
    reference_A = layer.lora_A.weight.detach().clone().requires_grad_()
    reference_B = layer.lora_B.weight.detach().clone().requires_grad_()
    reference_magnitude = layer.lora_magnitude_vector.detach().clone().requires_grad_()
    x = torch.randn(4, 64, requires_grad=True)
    x_reference = x.detach().clone().requires_grad_()

    layer(x).pow(2).sum().backward()
    # The same DoRA math on a plain float32 weight: the dequantized one.
    weight = layer.base_weight().detach()
    delta = reference_B @ reference_A * 2.0
    scale = reference_magnitude / (weight + delta).norm(dim=1).detach()
    reference = scale * (F.linear(x_reference, weight) + F.linear(x_reference, delta)) + layer.bias.detach()
    reference.pow(2).sum().backward()

    for ours, theirs in [
        (x.grad, x_reference.grad),
        (layer.lora_A.weight.grad, reference_A.grad),
        (layer.lora_B.weight.grad, reference_B.grad),
        (layer.lora_magnitude_vector.grad, reference_magnitude.grad),
    ]:
        assert ours is not None and ours.abs().sum() > 0
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert layer.weight.grad is None and layer.bias.grad is None


@pytest.mark.parametrize("mode", MODES)
def test_weights_are_quantized_as_they_load(tiny_llama_dir, mode):
    def prepare(model: nn.Module) -> None:
        quantize_model(model, mode, compute_dtype=torch.float32)
        apply_lora(model, LoRAConfig(rank=4, targets=["q", "v"]))

    model = load_model(tiny_llama_dir, dtype=torch.float32, prepare=prepare).eval()
    full = load_model(tiny_llama_dir, dtype=torch.float32).eval()
    layers = quantized_layers(model)
    assert len(layers) == 2 * 7  # every linear layer of both blocks; not the head
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    assert isinstance(model.model.layers[0].self_attn.k_proj, QuantizedLinear)
    for name, layer in layers.items():
        # Only the packed / int8 data: no tensor of the layer has the full-precision weight's dtype and shape.
        full_precision = [
            t
            for t in layer.state_dict().values()
            if t.dtype == torch.float32 and t.shape == (layer.out_features, layer.in_features)
        ]
        assert not full_precision, name
        assert layer.weight.dtype == (torch.int8 if mode == "bnb.int8" else torch.float32), name
    assert not model.model.layers[1].self_attn.v_proj.lora_A.weight.is_meta

    # The model computes what the full-precision model computes on bitsandbytes' dequantized weights.
    with torch.no_grad():
        for name, layer in layers.items():
            full.get_submodule(name).weight.copy_(
                bnb_round_trip(full.get_submodule(name).weight, mode, torch.float32, True)
            )
        torch.testing.assert_close(model(input_ids()), full(input_ids()), atol=1e-5, rtol=1e-5)


def test_qlora_training_step_on_a_loaded_model(tiny_llama_dir):
    model = load_model(tiny_llama_dir, dtype=torch.bfloat16, prepare=lambda m: quantize_model(m, "bnb.nf4"))
    apply_lora(model, LoRAConfig(rank=4, targets=["all-linear"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    logits = model(input_ids())
    assert logits.dtype == torch.bfloat16
    F.cross_entropy(logits.float().flatten(0, 1), input_ids().flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert sum(p.grad.abs().sum() for p in trainable) > 0


def test_qlora_adapter_merges_into_the_unquantized_base(tiny_llama_dir, tmp_path):
    config = LoRAConfig(rank=4, alpha=8, targets=["q", "down"])
    qlora = load_model(
        tiny_llama_dir, dtype=torch.float32, prepare=lambda m: quantize_model(m, "bnb.nf4", compute_dtype=torch.float32)
    )
    apply_lora(qlora, config)
    randomize_adapter(qlora)
    save_peft_adapter(qlora, config, tmp_path / "adapter", str(tiny_llama_dir))
    q_proj = qlora.model.layers[1].self_attn.q_proj
    delta = q_proj.delta_weight().detach()
    qlora_logits = qlora(input_ids()).detach()

    merge_adapter(tiny_llama_dir, tmp_path / "adapter", tmp_path / "merged")
    merged = load_model(tmp_path / "merged", dtype=torch.float32).eval()
    full = load_model(tiny_llama_dir, dtype=torch.float32)
    # Into the full-precision base weight, not the 4-bit one the adapter was trained against.
    torch.testing.assert_close(
        merged.model.layers[1].self_attn.q_proj.weight,
        full.model.layers[1].self_attn.q_proj.weight + delta,
        atol=1e-6,
        rtol=0,
    )
    torch.testing.assert_close(
        merged.model.layers[1].self_attn.k_proj.weight, full.model.layers[1].self_attn.k_proj.weight
    )
    # The merged model is the full-precision base with the adapter, which the 4-bit model only approximates.
    load_peft_adapter(full, tmp_path / "adapter")
    with torch.no_grad():
        merged_logits = merged(input_ids())
        torch.testing.assert_close(merged_logits, full(input_ids()), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(merged_logits, qlora_logits, atol=1e-3)

    # Merging in place on the quantized model folds the adapter into the dequantized weight.
    dequantized = q_proj.base_weight().detach()
    merge_lora_(qlora)
    torch.testing.assert_close(qlora.model.layers[1].self_attn.q_proj.weight, dequantized + delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(qlora(input_ids()), qlora_logits, atol=1e-5, rtol=1e-5)


def test_unknown_quantization_mode_is_a_config_error(tiny_llama_dir):
    with pytest.raises(ConfigError, match="--quantize 'bnb.nf3': choose one of bnb.nf4, bnb.fp4, bnb.int8"):
        load_model(tiny_llama_dir, prepare=lambda m: quantize_model(m, "bnb.nf3"))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_qlora_on_cuda_matches_the_dequantized_model(tiny_llama_dir, mode):
    def prepare(model: nn.Module) -> None:
        quantize_model(model, mode, compute_dtype=torch.bfloat16)

    model = load_model(tiny_llama_dir, dtype=torch.bfloat16, device="cuda", prepare=prepare)
    apply_lora(model, LoRAConfig(rank=4, targets=["all-linear"], dora=True))
    randomize_adapter(model)
    ids = input_ids().cuda()
    logits = model(ids)
    logits.float().pow(2).mean().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.is_cuda and p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    with torch.no_grad():
        for layer in quantized_layers(model).values():
            stored_bytes = layer.weight.numel() * layer.weight.element_size()
            assert layer.weight.is_cuda and stored_bytes < 2 * layer.out_features * layer.in_features  # < bf16
        reference = model(ids)
        merge_lora_(model)
        torch.testing.assert_close(model(ids), reference, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.int8"])
def test_compiled_qlora_keeps_only_the_packed_weight_for_backward(mode):
    """Under torch.compile the forward graph's saved tensors (what lives from forward to backward) hold no
    full-precision copy of the base weight: the backward dequantizes again. A traced dequantization would be merged
    across forward and backward by the compiler and keep the (out, in) weight alive, QLoRA's whole saving lost."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    torch.manual_seed(0)
    out_features, in_features = 96, 128
    layer = LoRALinear(
        QuantizedLinear(nn.Linear(in_features, out_features), WeightQuantization(mode, torch.float32)),
        LoRAConfig(rank=4, alpha=8),
    )
    randomize_adapter(layer)
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def record_forward(graph_module, example_inputs):
        # The forward graph returns the layer output first, then the tensors saved for the backward.
        output_node = next(node for node in graph_module.graph.nodes if node.op == "output")
        for node in output_node.args[0][1:]:
            value = node.meta.get("val") if node is not None else None
            if isinstance(value, torch.Tensor):
                saved.append((tuple(value.shape), value.dtype))
        return graph_module.forward

    backend = aot_autograd(
        fw_compiler=record_forward, bw_compiler=lambda graph_module, _: graph_module.forward,
        partition_fn=min_cut_rematerialization_partition,
    )
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    x = torch.randn(2, 7, in_features, requires_grad=True)
    compiled(x).sum().backward()
    eager_x = x.detach().clone().requires_grad_(True)
    layer(eager_x).sum().backward()

    torch.testing.assert_close(x.grad, eager_x.grad)
    assert saved, "the compiled forward saved nothing at all: the check did not run"
    assert ((out_features, in_features), torch.float32) not in saved, saved
    assert (tuple(layer.weight.shape), layer.weight.dtype) in saved  # the packed weight, dequantized in the backward
