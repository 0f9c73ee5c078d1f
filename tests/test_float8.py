"""The 8-bit float base (`--quantize fp8`): each layer's forward and input gradient stay within float8's precision
of the full-precision layer, whatever the magnitude of its rows and columns; the weight lives only as two float8
copies; LoRA over it trains a real pretrained model like the full-precision base does; compiled, nothing of full
precision is kept for the backward; a process group moves it (DDP and FSDP2 in test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from test_finetune import finetune, read_metrics
from torch import nn

from litft.adapters.float8 import FLOAT8, quantize_weight
from litft.adapters.lora import LoRAConfig, LoRALinear
from litft.adapters.quantization import QuantizedLinear, WeightQuantization, quantize_model
from litft.checkpoint import load_model

# e4m3 keeps 3 mantissa bits: one rounding is off by at most 1/16 of the value; a dot product of many such
# roundings (weights and activations) averages to a few percent of the output's norm.
GEMM_TOLERANCE = 0.06


def relative_error(value: torch.Tensor, reference: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    difference = (value.float() - reference.float()).norm(dim=dim)
    return difference / reference.float().norm(dim=dim)


def skewed_linear(in_features: int = 128, out_features: int = 96, device: str = "cpu") -> nn.Linear:
    """A linear layer whose rows and columns span four orders of magnitude: a scale applied along the wrong axis,
    or one scale for the whole tensor, loses the small rows and columns."""
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        linear.weight.normal_(generator=generator)
        linear.weight.mul_(torch.logspace(-2, 2, out_features)[torch.randperm(out_features, generator=generator)][:, None])
        linear.weight.mul_(torch.logspace(-2, 2, in_features)[torch.randperm(in_features, generator=generator)][None, :])
    return linear.to(device)


def float8_layer(linear: nn.Linear, dtype: torch.dtype) -> QuantizedLinear:
    return QuantizedLinear(linear, WeightQuantization("fp8", dtype))


def check_float8_layer(device: str, dtype: torch.dtype, in_features: int, out_features: int) -> None:
    reference = skewed_linear(in_features, out_features, device).to(dtype)
    layer = float8_layer(reference, dtype)
    x = torch.randn(3, 40, in_features, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 40, out_features, device=device, dtype=dtype)
    x_reference = x.detach().clone().requires_grad_(True)
    output, expected = layer(x), reference(x_reference)
    output.backward(grad)
    expected.backward(grad)

    assert output.dtype == dtype and output.shape == expected.shape
    assert relative_error(output, expected) < GEMM_TOLERANCE
    assert relative_error(x.grad, x_reference.grad) < GEMM_TOLERANCE
    # Every output feature and every input feature is as precise as the largest ones (one scale per row and per
    # column of the weight, one per token of the activations).
    features_out = relative_error(output.reshape(-1, out_features), expected.reshape(-1, out_features), dim=0)
    features_in = relative_error(x.grad.reshape(-1, in_features), x_reference.grad.reshape(-1, in_features), dim=0)
    assert features_out.max() < 2 * GEMM_TOLERANCE and features_in.max() < 2 * GEMM_TOLERANCE


def test_float8_layer_is_within_float8_precision_of_the_full_precision_layer():
    check_float8_layer("cpu", torch.float32, in_features=128, out_features=96)
    check_float8_layer("cpu", torch.bfloat16, in_features=128, out_features=96)


def test_the_weight_lives_as_two_float8_copies_that_round_to_it():
    weight = skewed_linear().weight.detach()
    stored = quantize_weight(weight)
    assert stored["weight"].dtype == torch.uint8 and stored["weight"].shape == (96, 128)
    assert stored["weight_transposed"].dtype == torch.uint8 and stored["weight_transposed"].shape == (128, 96)
    forward = stored["weight"].view(FLOAT8).float() * stored["weight_scale"][:, None]
    transposed = stored["weight_transposed"].view(FLOAT8).float() * stored["weight_transposed_scale"][:, None]
    # Each element is one float8 rounding of the weight: at most 1/16 off, but for values float8 cannot hold
    # relative to the largest of their row (those round to zero or a subnormal).
    # (float8 normals start at 2^-6 of the unit that 448, the row's largest, is scaled to).
    for copy, scaled_along in ((forward, 1), (transposed.t(), 0)):
        representable = weight.abs() >= 2**-6 * weight.abs().amax(dim=scaled_along, keepdim=True) / 448
        error = (copy - weight).abs() / weight.abs()
        assert error[representable].max() <= 1 / 16 + 1e-6

    layer = float8_layer(skewed_linear(), torch.float32)
    lora = LoRALinear(layer, LoRAConfig(rank=4, alpha=8))
    names = {name for name, _ in lora.named_parameters()} | {name for name, _ in lora.named_buffers()}
    assert {"weight", "weight_transposed", "weight_scale", "weight_transposed_scale"} <= names
    assert not lora.weight.requires_grad and not lora.weight_transposed.requires_grad


def test_only_layers_with_sizes_divisible_by_16_run_in_float8(stories_dir):
    # stories260K's MLP is 172 wide: those layers keep the compute dtype, its attention projections go float8.
    model = load_model(stories_dir, dtype=torch.float32, prepare=lambda m: quantize_model(m, "fp8", torch.float32))
    attention = model.model.layers[0].self_attn.q_proj
    assert isinstance(attention, QuantizedLinear) and attention.weight.dtype == torch.uint8
    assert type(model.model.layers[0].mlp.gate_proj) is nn.Linear


def test_lora_on_a_float8_base_trains_the_pretrained_model_like_the_full_precision_base(tmp_path, stories_dir):
    flags = ["--train.global_batch_size", "8", "--train.micro_batch_size", "4", "--train.max_steps", "8",
             "--train.lr", "3e-3", "--train.warmup_steps", "0", "--data.limit", "64", "--data.max_seq_length", "128",
             "--lora.rank", "8", "--lora.targets", "[all-linear]"]
    finetune("lora", stories_dir, tmp_path / "full-precision", *flags)
    finetune("qlora", stories_dir, tmp_path / "float8", "--quantize", "fp8", *flags)
    reference = {step: row["train/loss"] for step, row in read_metrics(tmp_path / "full-precision").items()}
    float8 = {step: row["train/loss"] for step, row in read_metrics(tmp_path / "float8").items()}
    assert reference.keys() == float8.keys() and len(reference) == 8
    assert float8[1] != reference[1]  # the float8 path really ran (its rounding shows from the first step)
    for step, loss in reference.items():  # the same trajectory, within float8's rounding of the attention layers
        assert float8[step] == pytest.approx(loss, rel=0.01), (step, float8, reference)
    assert float8[8] < float8[1] - 0.1  # and it learns
    assert (tmp_path / "float8" / "final" / "adapter_model.safetensors").exists()


def test_compiled_float8_base_keeps_no_full_precision_weight_for_backward():
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    layer = LoRALinear(float8_layer(skewed_linear(), torch.float32), LoRAConfig(rank=4, alpha=8))
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def record_forward(graph_module, example_inputs):
        output_node = next(node for node in graph_module.graph.nodes if node.op == "output")
        for node in output_node.args[0][1:]:  # the layer output first, then what the backward keeps
            value = node.meta.get("val") if node is not None else None
            if isinstance(value, torch.Tensor):
                saved.append((tuple(value.shape), value.dtype))
        return graph_module.forward

    backend = aot_autograd(fw_compiler=record_forward, bw_compiler=lambda graph_module, _: graph_module.forward,
                           partition_fn=min_cut_rematerialization_partition)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    x = torch.randn(2, 7, 128, requires_grad=True)
    compiled(x).sum().backward()
    eager_x = x.detach().clone().requires_grad_(True)
    layer(eager_x).sum().backward()

    torch.testing.assert_close(x.grad, eager_x.grad)
    assert saved, "the compiled forward saved nothing at all: the check did not run"
    full_precision = {((96, 128), torch.float32), ((128, 96), torch.float32)}
    assert not full_precision & set(saved), saved
    assert ((128, 96), torch.uint8) in saved  # the transposed float8 copy, for the input gradient


@pytest.mark.gpu
def test_float8_layer_on_cuda_is_within_float8_precision():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 GEMMs need compute capability 8.9+")
    check_float8_layer("cuda", torch.bfloat16, in_features=4096, out_features=1024)
    layer = LoRALinear(float8_layer(skewed_linear(4096, 1024, "cuda").to(torch.bfloat16), torch.bfloat16),
                       LoRAConfig(rank=16, alpha=32))
    x = torch.randn(4, 256, 4096, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(torch.compile(layer)(x), layer(x), atol=0.05 * layer(x).abs().max().item(), rtol=0)


def test_fsdp2_before_torch_2_13_refuses_the_float8_base_in_one_line(monkeypatch):
    from litft.errors import ConfigError
    from litft.training.parallel import refuse_integer_parameters_before_torch_2_13

    model = nn.Sequential(float8_layer(nn.Linear(32, 16), torch.float32))
    refuse_integer_parameters_before_torch_2_13(nn.Linear(32, 16))  # a float model passes on any version
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    with pytest.raises(ConfigError, match="--quantize fp8 with --strategy fsdp needs torch 2.13 or newer"):
        refuse_integer_parameters_before_torch_2_13(model)
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    refuse_integer_parameters_before_torch_2_13(model)
