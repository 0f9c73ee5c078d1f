"""q, k and v split into heads and rotated from their projections' joined output, with a backward of one kernel
(`litft.models.rotary_heads`): the same forward as the model's own code, and the joined gradient autograd gives,
through the torch formula (CPU) and the Triton kernel (interpreter on CPU, and the GPU); full and partial rotary,
strided gradients, a table shared by the rows; Llama with LoRA's joined q/k/v and Phi-3's fused qkv_proj train
to the same loss and gradients through it, eager and compiled."""

from __future__ import annotations

import pytest
import torch
from conftest import random_lora_model, square_loss_and_grads, triton_interpreter

from litft.adapters import lora_projections
from litft.models import rotary_heads
from litft.models.common import apply_rotary

LLAMA = {
    "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 128, "tie_word_embeddings": False,
}
PHI3 = dict(LLAMA, model_type="phi3", partial_rotary_factor=0.75)  # a fused qkv_proj, 6 of 8 dims rotated
GEMMA = dict(LLAMA, model_type="gemma", head_dim=8, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
QWEN3 = dict(LLAMA, model_type="qwen3", head_dim=8)  # per-head q_norm, k_norm before the rotation


@pytest.fixture(params=["torch", "kernel"])
def path(request, monkeypatch):
    """The backward's torch formula (CPU), or its Triton kernel in Triton's interpreter."""
    if request.param == "torch":
        yield request.param
        return
    with triton_interpreter(monkeypatch, rotary_heads._kernel):
        yield request.param


def tables(rows, tokens, rotary_dim, shared=False):
    """cos, sin (rows or 1, tokens, rotary_dim) in float32, as RotaryEmbedding makes them (positions offset per
    row, as packed or left-padded rows have them)."""
    positions = torch.arange(tokens)[None] + 3 * torch.arange(1 if shared else rows)[:, None]
    frequencies = positions[..., None].float() / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    angles = torch.cat((frequencies, frequencies), dim=-1)
    return angles.cos(), angles.sin()


def written_as_the_model_does(joined, cos, sin, n_head, n_kv_head, head_dim):
    """The model's own code before this module: split, view, transpose, rotate (autograd's backward)."""
    B, T, _ = joined.shape
    q, k, v = joined.split([n_head * head_dim, n_kv_head * head_dim, n_kv_head * head_dim], dim=-1)
    q = q.view(B, T, n_head, head_dim).transpose(1, 2)
    k = k.view(B, T, n_kv_head, head_dim).transpose(1, 2)
    v = v.contiguous().view(B, T, n_kv_head, head_dim).transpose(1, 2)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def joined_gradient(function, joined, cos, sin, heads, output_grads):
    joined = joined.detach().requires_grad_()
    outputs = function(joined, cos, sin, *heads)
    torch.autograd.backward(outputs, output_grads)
    return outputs, joined.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,rotary_dim,shared", [((4, 2, 16), 16, False), ((3, 1, 24), 12, True)],
                         ids=["full-rotary", "partial-rotary-shared-table"])
def test_forward_as_written_and_the_joined_gradient_of_autograd(path, dtype, heads, rotary_dim, shared):
    """Rows of 37 tokens (no whole block), strided output gradients (attention's may be transposed views). float32:
    autograd's numbers bit for bit; bf16: the float32 formula on the same rounded inputs, rounded once (the
    interpreter truncates where a GPU rounds to nearest: within one unit in the last place)."""
    torch.manual_seed(0)
    n_head, n_kv_head, head_dim = heads
    B, T = 2, 37
    joined = torch.randn(B, T, (n_head + 2 * n_kv_head) * head_dim).to(dtype)
    cos, sin = tables(B, T, rotary_dim, shared)
    output_grads = [torch.randn(B, T, count, head_dim).to(dtype).transpose(1, 2)
                    for count in (n_head, n_kv_head, n_kv_head)]
    ours, grad = joined_gradient(rotary_heads.rotary_heads, joined, cos, sin, heads, output_grads)
    expected, expected_grad = joined_gradient(written_as_the_model_does, joined, cos.to(dtype), sin.to(dtype), heads,
                                              output_grads)
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))
    assert grad.dtype == dtype and grad.shape == joined.shape
    if dtype == torch.float32:
        assert torch.equal(grad, expected_grad)
    else:
        exact = joined_gradient(written_as_the_model_does, joined.float(), cos.to(dtype).float(),
                                sin.to(dtype).float(), heads, [g.float() for g in output_grads])[1]
        unit = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)  # bf16's last place
        allowed = unit * (0.5 if path == "torch" else 1.0)
        assert ((grad.float() - exact).abs() <= allowed).all()


def test_without_gradients_the_autograd_function_is_not_entered(monkeypatch):
    """Decoding (no gradients) and a frozen joined output keep the plain code, which the compiled decode step
    traces; the values are the written code's."""
    def refuse(*args):
        raise AssertionError("RotaryHeads entered without gradients")

    monkeypatch.setattr(rotary_heads.RotaryHeads, "apply", refuse)
    heads = (4, 2, 16)
    joined = torch.randn(2, 5, 128, requires_grad=True)
    cos, sin = tables(2, 5, 16)
    expected = written_as_the_model_does(joined.detach(), cos, sin, *heads)
    with torch.no_grad():
        outputs = rotary_heads.rotary_heads(joined, cos, sin, *heads)
    frozen = rotary_heads.rotary_heads(joined.detach(), cos, sin, *heads)
    for got in (outputs, frozen):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def lora_model(config):
    model = random_lora_model(config)
    if config["model_type"] != "phi3":
        assert lora_projections.join_frozen_weights(model) > 0  # q, k, v: one GEMM, one joined output
    return model


def counting_backward_calls(monkeypatch) -> list[int]:
    calls = []
    formula = rotary_heads._backward_torch

    def counting(*args):
        calls.append(1)
        return formula(*args)

    monkeypatch.setattr(rotary_heads, "_backward_torch", counting)
    return calls


@pytest.mark.parametrize("config,compiled", [
    (LLAMA, False), (LLAMA, True), (PHI3, False), (PHI3, True), (GEMMA, False), (QWEN3, False),
], ids=["llama-lora-joined-qkv-eager", "llama-lora-joined-qkv-compiled", "phi3-fused-qkv-proj-eager",
        "phi3-fused-qkv-proj-compiled", "gemma-lora-joined-qkv-eager", "qwen3-qk-norm-eager"])
def test_a_model_trains_through_it_to_the_losses_and_gradients_as_written(config, compiled, monkeypatch):
    """float32 on CPU: the loss and every adapter gradient equal those of the model's code as written
    (`rotary_heads.ENABLED` False), to the last bit eagerly and within float32 rounding compiled; the backward ran
    once per layer (never for Qwen3, whose per-head norms come between the projections and the rotation)."""
    model = lora_model(config)
    input_ids = torch.randint(0, config["vocab_size"], (2, 12))
    calls = counting_backward_calls(monkeypatch)
    step = None
    if compiled:
        torch._dynamo.reset()
        step = torch.compile(model)
    loss, grads = square_loss_and_grads(model, input_ids, step)
    expected_calls = 0 if config is QWEN3 else config["num_hidden_layers"]
    assert len(calls) == expected_calls
    monkeypatch.setattr(rotary_heads, "ENABLED", False)
    if compiled:
        torch._dynamo.reset()
        step = torch.compile(model)
    expected_loss, expected_grads = square_loss_and_grads(model, input_ids, step)
    assert len(calls) == expected_calls
    tolerance = dict(rtol=1e-5, atol=1e-6) if compiled else dict(rtol=0, atol=0)
    torch.testing.assert_close(loss, expected_loss, **tolerance)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **tolerance, msg=name)


@pytest.mark.gpu
def test_on_the_gpu_at_llama_8b_size():
    """llama-8b's attention (32 q heads, 8 kv heads, head_dim 128) on 4 rows of 2,048 tokens in bf16, the output
    gradients transposed views as cuDNN's attention gives them: the kernel's joined gradient within one rounding of
    the float32 formula, no further from it than autograd's bf16 backward, and the same bits every run."""
    torch.manual_seed(0)
    heads = (32, 8, 128)
    B, T = 4, 2048
    joined = torch.randn(B, T, 48 * 128, device="cuda", dtype=torch.bfloat16)
    cos, sin = (table.cuda() for table in tables(B, T, 128))
    output_grads = [torch.randn(B, T, count, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                    for count in (32, 8, 8)]
    _, grad = joined_gradient(rotary_heads.rotary_heads, joined, cos, sin, heads, output_grads)
    _, again = joined_gradient(rotary_heads.rotary_heads, joined, cos, sin, heads, output_grads)
    bf16 = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
    _, autograd = joined_gradient(written_as_the_model_does, joined, *bf16, heads, output_grads)
    _, exact = joined_gradient(written_as_the_model_does, joined.float(), bf16[0].float(), bf16[1].float(), heads,
                               [g.float() for g in output_grads])
    assert torch.equal(grad, again)

    def error(value):
        return ((value.float() - exact).norm() / exact.norm()).item()

    assert error(grad) <= error(autograd) + 1e-6
    assert error(grad) < 3e-3
