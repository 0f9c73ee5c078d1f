"""The down projection of a gated MLP with its LoRA adapter in one operator (`litft.adapters.lora_gated_down`): its
kernels compute the activation's formulas (Triton's interpreter on CPU, and the GPU), and a model through it has the
loss and gradients of the same model with each LoRA layer computed on its own (SiLU for Llama, tanh-GELU for
Gemma; full-precision and 4-bit bases; compiled); where it does not apply (dropout) the model computes as before."""

from __future__ import annotations

import pytest
import torch
from conftest import compiled_recording_operators, random_lora_model, square_loss_and_grads, triton_interpreter
from torch import nn

from litft.adapters import adapter_gradients, gated_activation, lora_gated_down, lora_projections
from litft.adapters.lora import set_compute_together

LLAMA = {
    "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 128, "tie_word_embeddings": False,
}
GEMMA = dict(LLAMA, model_type="gemma", head_dim=8, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)


def reference(gate, up, grad_product, grad_low, activation):
    """(h, d gate, d up, g_low^T @ h) through torch's own activations and autograd, in float32."""
    gate = gate.detach().float().requires_grad_()
    up = up.detach().float().requires_grad_()
    act = nn.functional.gelu(gate, approximate="tanh") if activation == "gelu_tanh" else nn.functional.silu(gate)
    product = act * up
    product.backward(grad_product.float())
    return product.detach(), gate.grad, up.grad, grad_low.float().t() @ product.detach()


@pytest.fixture(params=["torch", "kernels"])
def path(request, monkeypatch):
    """The operator's torch formulas (CPU), or its Triton kernels in Triton's interpreter."""
    if request.param == "torch":
        yield request.param
        return
    with triton_interpreter(monkeypatch, lora_gated_down._kernels, adapter_gradients._kernels,
                            gated_activation._product_kernel):
        yield request.param


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [4, 20])
def test_kernels_compute_the_activation_its_gradient_and_the_adapter_gradient(path, activation, dtype, rank,
                                                                              monkeypatch):
    """Rows and columns that fill no whole tile, several row groups whose partial sums add up, a rank padded to the
    dot's size: d gate, d up and g_low^T @ h equal autograd's through torch's own activation."""
    monkeypatch.setattr(lora_gated_down, "MIN_GROUP_ROWS", 32)  # 150 rows: four groups of two 16-row tiles
    torch.manual_seed(0)
    rows, columns = 150, 200
    gate, up, grad_product = (torch.randn(rows, columns, dtype=dtype) * 2 for _ in range(3))
    grad_low = torch.randn(rows, rank, dtype=dtype)
    product, grad_gate, grad_up, grad_lora_a = reference(gate, up, grad_product, grad_low, activation)
    ours = gated_activation.gated_product(gate, up, activation)
    got_gate, got_up, got_lora_a = lora_gated_down.gated_backward(
        grad_product, gate, up, grad_low, activation, block_rows=16, block_columns=32, warps=4,
    )
    rounding = dict(rtol=1e-5, atol=5e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert ours.dtype == got_gate.dtype == got_up.dtype == dtype
    torch.testing.assert_close(ours.float(), product, **rounding)
    torch.testing.assert_close(got_gate.float(), grad_gate, **rounding)
    torch.testing.assert_close(got_up.float(), grad_up, **rounding)
    # The sum over 150 rows of products of rounded h: relative to the sum's scale.
    scale = grad_lora_a.abs().max()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((got_lora_a - grad_lora_a).abs().max() / scale) < tolerance


def test_kernels_read_the_halves_of_a_fused_gate_up_output_in_place(path):
    """Phi-3's gate and up are the two halves of one (M, 2N) output: rows a wider stride apart. Read in place, the
    kernels give what they give on contiguous copies. The torch path (no Triton) runs torch's CPU kernels, which
    take a vectorized loop on contiguous tensors and a scalar one on strided views: on some CPUs (an AMD EPYC here)
    the two round silu a float32 ulp apart (and the sums built on it a few), so there the comparison allows float32
    rounding (1e-6); the kernels must match exactly."""
    exact = {"rtol": 0, "atol": 0} if path != "torch" else {"rtol": 1e-6, "atol": 1e-6}
    torch.manual_seed(0)
    rows, columns, rank = 70, 48, 8
    gate_up = torch.randn(rows, 2 * columns)
    gate, up = gate_up.chunk(2, dim=-1)
    assert gated_activation.rows_of(gate).data_ptr() == gate.data_ptr()  # a view, not a copy
    grad_product, grad_low = torch.randn(rows, columns), torch.randn(rows, rank)
    strided = gated_activation.gated_product(gate, up, "silu")
    copied = gated_activation.gated_product(gate.contiguous(), up.contiguous(), "silu")
    torch.testing.assert_close(strided, copied, **exact)
    for got, expected in zip(
        lora_gated_down.gated_backward(grad_product, gate, up, grad_low, "silu", block_rows=16, block_columns=32),
        lora_gated_down.gated_backward(grad_product, gate.contiguous(), up.contiguous(), grad_low, "silu",
                                       block_rows=16, block_columns=32),
    ):
        torch.testing.assert_close(got, expected, **exact)


def gated_calls(model, input_ids) -> list[bool]:
    """One entry per call of the down operator in a forward: whether it was handed h (formed with gate and up)."""
    calls = []
    original = lora_gated_down.lora_gated_down

    def counting(*args, **kwargs):
        calls.append(args[3] is not None)
        return original(*args, **kwargs)

    lora_gated_down.lora_gated_down = counting
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        lora_gated_down.lora_gated_down = original
    return calls


PHI3 = dict(LLAMA, model_type="phi3")  # gate and up fused into one projection: the operator reads its halves


@pytest.mark.parametrize("config, product_with_gate_and_up",
                         [(LLAMA, True), (GEMMA, True), (PHI3, False), (LLAMA, False)],
                         ids=["llama-silu", "gemma-gelu-tanh", "phi3-fused-gate-up", "llama-product-apart"])
def test_model_through_the_operator_matches_each_layer_alone(path, config, product_with_gate_and_up, monkeypatch):
    """Llama's and Gemma's gate and up hand the down operator h, formed with them (`gated_mlp`); Phi-3's one
    gate_up projection, and the A/B's switch, leave the operator to form it."""
    if config is LLAMA and not product_with_gate_and_up:
        monkeypatch.setattr(lora_gated_down, "FUSED_PRODUCT", False)
    model = random_lora_model(config)
    input_ids = torch.randint(0, config["vocab_size"], (2, 12))
    assert gated_calls(model, input_ids) == [product_with_gate_and_up] * config["num_hidden_layers"]
    loss, grads = square_loss_and_grads(model, input_ids)
    set_compute_together(model, False)
    assert gated_calls(model, input_ids) == []
    reference_loss, reference_grads = square_loss_and_grads(model, input_ids)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_four_bit_base_through_the_operator_matches_each_layer_alone():
    pytest.importorskip("bitsandbytes")
    model = random_lora_model(LLAMA, quantize="bnb.nf4")
    input_ids = torch.randint(0, LLAMA["vocab_size"], (2, 12))
    assert gated_calls(model, input_ids) == [True, True]
    loss, grads = square_loss_and_grads(model, input_ids)
    set_compute_together(model, False)
    reference_loss, reference_grads = square_loss_and_grads(model, input_ids)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_model_runs_the_operator_and_matches_eager():
    model = random_lora_model(LLAMA)
    input_ids = torch.randint(0, LLAMA["vocab_size"], (2, 12))
    eager_loss, eager_grads = square_loss_and_grads(model, input_ids)
    compiled, operators = compiled_recording_operators(model)
    loss, grads = square_loss_and_grads(model, input_ids, step=compiled)
    assert any("lora_gated_down" in operator for operator in operators), operators
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_adapter_dropout_keeps_the_product_as_written():
    """With dropout the down projection's adapter reads h through a mask: the product is written as before, and
    the grouped operator takes down on its own."""
    model = random_lora_model(LLAMA, dropout=0.1).train()
    input_ids = torch.randint(0, LLAMA["vocab_size"], (2, 12))
    assert gated_calls(model, input_ids) == []
    model.eval()  # no dropout in evaluation: the operator applies again, handed h by gate and up
    assert gated_calls(model, input_ids) == [True, True]


def test_output_keeper_is_consulted_for_down():
    """Under offloaded checkpointing the keeper decides, as for the grouped operator: down's output (hidden 32
    from 96 features) is kept in the forward and handed back when the block is recomputed."""

    class Keeper:
        def __init__(self):
            self.kept, self.recomputing, self.asked = [], False, []

        def keeps(self, out_width, in_width):
            self.asked.append((out_width, in_width))
            return out_width < in_width

        def take(self, shapes):
            return self.kept.pop(0) if self.recomputing else None

        def keep(self, outputs):
            self.kept.append(outputs)

    model = random_lora_model(LLAMA)
    input_ids = torch.randint(0, LLAMA["vocab_size"], (2, 12))
    keeper = Keeper()
    with torch.no_grad(), lora_projections.keeping_outputs(keeper):
        first = model(input_ids)
        assert len(keeper.kept) == 2 and (32, 96) in keeper.asked
        keeper.recomputing = True
        second = model(input_ids)
    assert keeper.kept == []
    torch.testing.assert_close(first, second)


@pytest.mark.gpu
def test_kernels_at_llama_8b_width_on_the_gpu():
    """bf16 at llama-8b's MLP width: each output no further from float32 autograd than torch's own bf16 formula."""
    torch.manual_seed(0)
    rows, columns, rank = 8192, 14336, 16
    gate, up, grad_product = (torch.randn(rows, columns, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    grad_low = torch.randn(rows, rank, device="cuda", dtype=torch.bfloat16)
    product, grad_gate, grad_up, grad_lora_a = reference(gate, up, grad_product, grad_low, "silu")
    ours = gated_activation.gated_product(gate, up, "silu")
    got_gate, got_up, got_lora_a = lora_gated_down.gated_backward(grad_product, gate, up, grad_low, "silu")
    bf16_product = nn.functional.silu(gate) * up
    bf16_lora_a = grad_low.t() @ bf16_product

    def error(value, truth):
        return ((value.float() - truth).norm() / truth.norm()).item()

    assert error(ours, product) <= error(bf16_product, product) + 1e-4
    assert error(got_gate, grad_gate) < 5e-3 and error(got_up, grad_up) < 5e-3
    assert error(got_lora_a, grad_lora_a) <= error(bf16_lora_a, grad_lora_a) + 1e-4
