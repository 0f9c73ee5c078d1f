"""LoRA layers that share an input, computed together (`litft.adapters.lora_projections`): the same outputs and
gradients as each layer computed on its own, in eager mode, compiled and over a 4-bit base, with and without adapter
dropout; the layers that cannot join (DoRA, adapters switched off) still compute as before."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import compiled_recording_operators
from torch import nn

from litft.adapters import lora_dropout, lora_gated_down, lora_projections
from litft.adapters.lora import (
    LoRAConfig,
    LoRALinear,
    adapters_disabled,
    apply_lora,
    lora_modules,
    set_compute_together,
)
from litft.models import build_model
from litft.models.common import build_attention_context, default_position_ids

CONFIG = {
    "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 128, "tie_word_embeddings": False,
}


def lora_model(dtype=torch.float32, **lora) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(dict(CONFIG, **lora.pop("config", {}))).to(dtype)
    apply_lora(model, LoRAConfig(**{"rank": 4, "alpha": 8, "targets": ["all-linear"], **lora}))
    with torch.no_grad():  # B starts at zero; give the adapters something to contribute
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, 0.5)
    return model


def loss_and_grads(model: nn.Module, input_ids: torch.Tensor, step=None) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    logits = (model if step is None else step)(input_ids)
    loss = logits.float().square().mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_computes_what_each_layer_computes_alone(model: nn.Module, input_ids: torch.Tensor) -> dict:
    """The loss and every adapter's gradient of `model` equal those with each LoRA layer computed on its own;
    returns the gradients. Leaves the layers computing on their own."""
    loss, grads = loss_and_grads(model, input_ids)
    set_compute_together(model, False)
    reference_loss, reference_grads = loss_and_grads(model, input_ids)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    return grads


def count_calls(model: nn.Module, input_ids: torch.Tensor) -> int:
    """How many times the grouped forward operators run in one forward pass (the down projection of a gated MLP
    runs in its own, `lora_gated_down`)."""
    calls = 0
    names = [(lora_projections, "lora_projections"), (lora_gated_down, "lora_gated_down")]
    originals = [(module, name, getattr(module, name)) for module, name in names]

    def counting(original):
        def count(*args, **kwargs):
            nonlocal calls
            calls += 1
            return original(*args, **kwargs)

        return count

    for module, name, original in originals:
        setattr(module, name, counting(original))
    try:
        model(input_ids)
    finally:
        for module, name, original in originals:
            setattr(module, name, original)
    return calls


def test_grouped_layers_compute_what_each_layer_computes_alone():
    model = lora_model()
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 12))
    # q, k, v together; o; gate, up together; down: four groups per block, two blocks.
    assert count_calls(model, input_ids) == 8
    loss, grads = loss_and_grads(model, input_ids)
    set_compute_together(model, False)
    assert count_calls(model, input_ids) == 0
    reference_loss, reference_grads = loss_and_grads(model, input_ids)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert reference_grads.keys() == grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_adapted_layers_of_a_group_join_and_the_others_run_alone():
    """--lora.targets q,v (PEFT's classic choice): q and v share one operator, k stays a plain linear layer; the
    model computes what it computes with each layer alone."""
    model = lora_model(targets=["q", "v"])
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 12))
    assert type(model.blocks[0].self_attn.k_proj) is nn.Linear
    assert count_calls(model, input_ids) == 2  # one q/v group per block, nothing else adapted
    loss, grads = loss_and_grads(model, input_ids)
    set_compute_together(model, False)
    reference_loss, reference_grads = loss_and_grads(model, input_ids)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert len(grads) == 2 * 2 * 2
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_input_gradient_sums_every_projection_and_adapter():
    """dx of a q/k/v group is the sum over its three base weights and three adapters (checked by autograd on the
    layers one by one), also with biases and different ranks' scalings."""
    torch.manual_seed(1)
    layers = []
    for out_features, bias in ((12, True), (6, True), (6, False)):
        base = nn.Linear(10, out_features, bias=bias)
        layer = LoRALinear(base, LoRAConfig(rank=3, alpha=5, rslora=out_features == 6))
        with torch.no_grad():
            layer.lora_B.weight.normal_()
        layers.append(layer)
    x = torch.randn(2, 5, 10, requires_grad=True)
    outputs = LoRALinear.forward_together(x, layers)
    weights = [torch.randn_like(output) for output in outputs]
    sum((output * w).sum() for output, w in zip(outputs, weights)).backward()
    grads = [x.grad.clone()] + [p.grad.clone() for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
    x.grad = None
    for layer in layers:
        layer.zero_grad(set_to_none=True)
        layer.compute_together = False
    reference = [layer(x) for layer in layers]
    for output, expected in zip(outputs, reference):
        torch.testing.assert_close(output, expected)
    sum((output * w).sum() for output, w in zip(reference, weights)).backward()
    expected = [x.grad] + [p.grad for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_no_input_gradient_when_the_input_needs_none():
    """The first block's input comes from frozen embeddings: the backward skips dx (its K-wide GEMMs) there, and
    computes it where the input needs a gradient."""
    layer = LoRALinear(nn.Linear(8, 8), LoRAConfig(rank=2))
    asked: list[bool] = []
    original = lora_projections.lora_projections_backward

    def recording(*args):
        asked.append(args[11])  # input_grad
        return original(*args)

    lora_projections.lora_projections_backward = recording
    try:
        layer(torch.randn(3, 8)).sum().backward()
        x = torch.randn(3, 8, requires_grad=True)
        layer(x).sum().backward()
    finally:
        lora_projections.lora_projections_backward = original
    assert asked == [False, True]
    assert layer.lora_A.weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("variant", ["dora", "disabled"])
def test_layers_that_cannot_join_compute_as_before(variant):
    model = lora_model(dora=variant == "dora")
    model.eval()
    input_ids = torch.randint(0, CONFIG["vocab_size"], (1, 8))
    if variant == "disabled":
        with adapters_disabled(model):
            assert count_calls(model, input_ids) == 0
            with torch.no_grad():
                base_logits = model(input_ids)
        set_compute_together(model, False)
        with torch.no_grad(), adapters_disabled(model):
            torch.testing.assert_close(base_logits, model(input_ids))
    else:
        assert count_calls(model, input_ids) == 0


class FixedMask(nn.Module):
    """Adapter dropout with a given mask: x * mask / (1 - p), as nn.Dropout computes with the mask it draws."""

    def __init__(self, mask: torch.Tensor, p: float) -> None:
        super().__init__()
        self.mask, self.p = mask, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.view(x.shape) / (1 - self.p)


@pytest.fixture(params=["torch", "kernels", pytest.param("gpu", marks=pytest.mark.gpu)])
def mask_path(request):
    """The dropout masks drawn by torch's generator (CPU), by litft's Triton kernels in Triton's interpreter (CPU),
    or by the kernels on the GPU. The interpreter must be chosen before triton is imported (the kernels call
    triton's own jitted Philox functions), so without it the test runs again in a process that starts with it, and
    "elsewhere" tells the test body that its assertions ran there."""
    if request.param == "kernels" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.importorskip("triton")
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{request.node.name}"],
            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        yield "elsewhere"
        return
    yield request.param


def test_dropout_groups_and_computes_each_layer_alone_with_the_same_masks(mask_path, monkeypatch):
    """With adapter dropout the layers still compute together, each adapter reading x through a mask of its own;
    given those masks, every output and gradient equals each layer computed alone (its dropout applying the same
    mask). The masks drop about p of the elements, differ between the adapters of a group and between steps, and
    the backward draws the forward's masks again."""
    if mask_path == "elsewhere":
        return
    p = 0.3
    device = "cuda" if mask_path == "gpu" else "cpu"
    model = lora_model(dropout=p).to(device).train()
    lora_projections.join_frozen_weights(model)
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 12), device=device)
    seeds: list[int] = []  # each masked copy of an input, by the seed of its mask
    masked_input = lora_dropout.masked_input

    def recording(x, seed, dropout):
        assert lora_dropout.uses_kernels(x) == (mask_path != "torch")
        seeds.append(seed)
        return masked_input(x, seed, dropout)

    monkeypatch.setattr(lora_dropout, "masked_input", recording)
    torch.manual_seed(7)
    assert count_calls(model, input_ids) == 2 * 4  # per block: q/k/v, o, gate/up, down
    first_step = list(seeds)
    seeds.clear()
    torch.manual_seed(8)
    loss, grads = loss_and_grads(model, input_ids)
    layers = list(lora_modules(model).values())
    forward, backward = seeds[: len(layers)], seeds[len(layers) :]
    assert sorted(backward) == sorted(forward)  # drawn again in the backward, last call first
    assert len(set(forward)) == len(layers) and not set(forward) & set(first_step)

    masks = [
        lora_dropout.mask(torch.empty(24, layer.in_features, device=device), seed, p)
        for layer, seed in zip(layers, forward)
    ]
    dropped = torch.cat([mask.flatten() for mask in masks]).eq(0).float().mean().item()
    assert abs(dropped - p) < 0.05, dropped
    assert not torch.equal(masks[0], masks[1])  # q's and k's masks
    for layer, mask in zip(layers, masks):
        layer.lora_dropout = FixedMask(mask, p)
    set_compute_together(model, False)
    reference_loss, reference_grads = loss_and_grads(model, input_ids)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_is_off_in_evaluation_and_the_step_needs_no_mask():
    """In evaluation the adapters read x itself: the same logits as a model without dropout, and no mask drawn."""
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 12))
    with_dropout, without = lora_model(dropout=0.3).eval(), lora_model().eval()
    original = lora_dropout.masked_input
    lora_dropout.masked_input = None  # any call would fail
    try:
        with torch.no_grad():
            torch.testing.assert_close(with_dropout(input_ids), without(input_ids), rtol=0, atol=0)
    finally:
        lora_dropout.masked_input = original


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_dropout_draws_the_masks_eager_draws(device):
    """Compiled, the grouped operator still draws its masks' seed from the host generator when it runs (not once
    when traced): the same seed gives eager's loss and gradients, another seed other ones."""
    model = lora_model(dropout=0.2).to(device).train()
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 12), device=device)
    torch.manual_seed(3)
    eager_loss, eager_grads = loss_and_grads(model, input_ids)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    torch.manual_seed(4)
    other_loss, _ = loss_and_grads(model, input_ids, step=compiled)
    torch.manual_seed(3)
    loss, grads = loss_and_grads(model, input_ids, step=compiled)
    assert not torch.equal(other_loss, loss)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_autocast_groups_and_computes_in_the_autocast_dtype():
    """Under autocast (--precision bf16-mixed) the group casts its input as autocast casts F.linear's: outputs in
    bf16, gradients within bf16's rounding of the layers computed one by one under the same autocast."""
    model = lora_model()
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert count_calls(model, input_ids) == 8
        loss, grads = loss_and_grads(model, input_ids)
        set_compute_together(model, False)
        reference_loss, reference_grads = loss_and_grads(model, input_ids)
    mlp = model.blocks[0].mlp
    set_compute_together(model, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gate, up = LoRALinear.forward_together(torch.randn(3, CONFIG["hidden_size"]), [mlp.gate_proj, mlp.up_proj])
    assert gate.dtype == up.dtype == torch.bfloat16 and mlp.gate_proj.weight.dtype == torch.float32
    torch.testing.assert_close(loss, reference_loss, rtol=2e-2, atol=0)
    for name, grad in grads.items():
        relative = (grad - reference_grads[name]).norm() / reference_grads[name].norm()
        assert relative < 5e-2, (name, relative.item())


def test_compiled_model_runs_the_grouped_operators_and_matches_eager():
    """Compiled, the grouped operators run (q/k/v joined: the weights reach the operator still back to back, one
    base GEMM for the three) and compute what eager computes."""
    model = lora_model()
    lora_projections.join_frozen_weights(model)
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 12))
    eager_loss, eager_grads = loss_and_grads(model, input_ids)
    compiled, operators = compiled_recording_operators(model)
    loss, grads = loss_and_grads(model, input_ids, step=compiled)
    assert any("lora_projections" in operator for operator in operators), operators
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert base_gemm_count(compiled, input_ids) == 2 * 5  # q/k/v, o, gate, up, down


def test_bfloat16_group_is_as_close_to_float32_as_each_layer_alone():
    """In bf16 the grouped path adds in a GEMM's float32 accumulator where the layers alone rounded each output to
    bf16 first: it must be no further from the float32 result."""
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 12))
    reference = lora_model(torch.float32)(input_ids)
    model = lora_model(torch.bfloat16)
    with torch.no_grad():
        grouped = model(input_ids).float()
        set_compute_together(model, False)
        alone = model(input_ids).float()
    grouped_error = (grouped - reference).norm() / reference.norm()
    alone_error = (alone - reference).norm() / reference.norm()
    assert grouped_error < 1.2 * alone_error + 1e-3, (grouped_error, alone_error)


@pytest.mark.parametrize("joined", [False, True])
@pytest.mark.parametrize("mode", ["bnb.nf4", "bnb.int8"])
def test_quantized_base_groups_and_matches_each_layer(mode, joined):
    """Also joined: q/k/v's 4-bit weights dequantize into one buffer for one base GEMM."""
    pytest.importorskip("bitsandbytes")
    from litft.adapters.quantization import quantize_model

    torch.manual_seed(0)
    model = build_model(CONFIG)
    quantize_model(model, mode, torch.float32)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["all-linear"]))
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, 0.5)
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 12))
    if joined:
        assert lora_projections.join_frozen_weights(model) == 2
    assert count_calls(model, input_ids) == 8
    assert base_gemm_count(model, input_ids) == 2 * (5 if joined else 7)
    assert_computes_what_each_layer_computes_alone(model, input_ids)


def test_block_forward_with_the_attention_context():
    """The decoder block as the training loop calls it (rotary tables, attention context) groups too."""
    model = lora_model()
    x = torch.randn(1, 6, CONFIG["hidden_size"], requires_grad=True)
    positions = default_position_ids(1, 6, 0, x.device)
    cos, sin = model.model.rotary_emb(positions)
    context = build_attention_context(1, 6, x.device, None, None, None)
    out = model.blocks[0](x, cos, sin, context)
    out.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    set_compute_together(model, False)
    model.blocks[0](x, cos, sin, context).sum().backward()
    torch.testing.assert_close(grad, x.grad, rtol=1e-4, atol=1e-6)


def base_gemm_count(model: nn.Module, input_ids: torch.Tensor) -> int:
    """How many in-place GEMMs (the base projections' addmm_, accumulating into the adapters' output) one forward
    pass runs, counted by the profiler inside the grouped operator."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        model(input_ids)
    return sum(event.count for event in profiler.key_averages() if event.key == "aten::addmm_")


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_joined_frozen_weights_keep_names_and_values_and_run_one_gemm_per_group(qkv_bias):
    """`join_frozen_weights` lays q/k/v's frozen weights back to back in one storage, and gate's and up's in another:
    every parameter keeps its name, shape and values; the grouped operator then runs one base GEMM for q/k/v (gate
    and up keep one each: they are not marked), and the model computes (loss and every adapter's gradient) what
    each layer computes alone."""
    model = lora_model(config={"attention_bias": qkv_bias})
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 12))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert base_gemm_count(model, input_ids) == 2 * 7  # one per projection, two blocks
    assert lora_projections.join_frozen_weights(model) == 2  # q/k/v in each block
    assert lora_projections.join_frozen_weights(model) == 0  # already joined
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    attention, mlp = model.blocks[0].self_attn, model.blocks[0].mlp
    qkv = [attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]
    assert all(not weight.requires_grad for weight in qkv)
    assert len({weight.untyped_storage().data_ptr() for weight in qkv}) == 1
    assert lora_projections.back_to_back(qkv) is not None
    assert lora_projections.back_to_back([mlp.gate_proj.weight, mlp.up_proj.weight]) is not None
    assert not mlp.gate_proj.joined_base and not mlp.up_proj.joined_base
    assert base_gemm_count(model, input_ids) == 2 * 5  # q/k/v, o, gate, up, down
    grads = assert_computes_what_each_layer_computes_alone(model, input_ids)
    assert len(grads) == 2 * 7 * 2 and all(grad.abs().sum() > 0 for grad in grads.values())


def test_a_joined_group_whose_weights_were_moved_apart_still_computes_each_layer():
    """Marked joined, but the weights no longer back to back (FSDP2 re-allocates each parameter): each weight's GEMM
    writes its own columns, with the same result."""
    model = lora_model()
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 12))
    lora_projections.join_frozen_weights(model)
    for layer in lora_modules(model).values():
        layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    assert base_gemm_count(model, input_ids) == 2 * 7
    assert_computes_what_each_layer_computes_alone(model, input_ids)


def test_weights_out_of_order_in_one_storage_do_not_join():
    """Only rows in the group's own order, back to back, make the joined matrix: k before q, or a gap, does not."""
    storage = torch.randn(10, 4)
    q, k, v = storage[0:4], storage[4:6], storage[6:8]
    assert torch.equal(lora_projections.back_to_back([q, k, v]), storage[:8])
    assert lora_projections.back_to_back([k, q, v]) is None
    assert lora_projections.back_to_back([q, k, storage[7:9]]) is None
    assert lora_projections.back_to_back([q, k, v.clone()]) is None


def test_the_training_loader_joins_the_groups(family_checkpoints):
    """`litft finetune lora` loads the base with each q/k/v group's weights joined (not for FSDP2, whose shards
    would each take their own storage)."""
    from litft.commands.finetune import load_for_training

    model = load_for_training(
        "lora", family_checkpoints["llama"], torch.float32, torch.device("cpu"),
        LoRAConfig(rank=2, targets=["all-linear"]), None,
    )
    for block in model.blocks:
        attention, mlp = block.self_attn, block.mlp
        qkv = [attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]
        assert lora_projections.back_to_back(qkv) is not None
        assert all(layer.joined_base for layer in (attention.q_proj, attention.k_proj, attention.v_proj))
        assert not mlp.gate_proj.joined_base
    apart = load_for_training(
        "lora", family_checkpoints["llama"], torch.float32, torch.device("cpu"),
        LoRAConfig(rank=2, targets=["all-linear"]), None, join_weights=False,
    )
    assert not any(layer.joined_base for layer in lora_modules(apart).values())


@pytest.mark.gpu
def test_grouped_projections_on_the_gpu_at_llama_8b_width():
    """q/k/v of llama-8b's width in bf16 on the GPU (cuBLAS's beta = 1 epilogue, the layouts the kernels take):
    outputs and gradients as close to float32 as the layers computed one by one."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    layers = []
    for out_features in (4096, 1024, 1024):
        layer = LoRALinear(nn.Linear(4096, out_features, bias=False, device=device), LoRAConfig(rank=16, alpha=32))
        with torch.no_grad():
            layer.weight.mul_(0.5)
            layer.lora_B.weight.normal_(0, 0.02)
        layers.append(layer)

    def run(dtype: torch.dtype, together: bool) -> list[torch.Tensor]:
        for layer in layers:
            layer.compute_together = together
            layer.weight.data = layer.weight.data.to(dtype)
            layer.zero_grad(set_to_none=True)
        x = torch.randn(2, 1024, 4096, device=device, generator=torch.Generator(device).manual_seed(1))
        x = x.to(dtype).requires_grad_(True)
        outputs = LoRALinear.forward_together(x, layers) if together else [layer(x) for layer in layers]
        generator = torch.Generator(device).manual_seed(2)
        weights = [torch.randn(output.shape, device=device, generator=generator) for output in outputs]
        sum((output.float() * w).sum() for output, w in zip(outputs, weights)).backward()
        grads = [x.grad] + [p.grad for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
        return [t.float() for t in (*outputs, *grads)]

    reference = run(torch.float32, together=False)
    grouped, alone = run(torch.bfloat16, together=True), run(torch.bfloat16, together=False)
    for index, want in enumerate(reference):
        grouped_error = ((grouped[index] - want).norm() / want.norm()).item()
        alone_error = ((alone[index] - want).norm() / want.norm()).item()
        assert grouped_error < 1.2 * alone_error + 1e-3, (index, grouped_error, alone_error)


def test_compiled_blocks_keep_the_adapters_off_pass_apart():
    """DPO's reference pass switches the adapters off on the instance; the compiled blocks, traced with the
    grouped operators, must trace that pass anew and compute the base model, then the adapted one again."""
    from litft.training.compilation import compile_blocks

    model = lora_model()
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 12))
    with torch.no_grad():
        adapted = model(input_ids)
        with adapters_disabled(model):
            base = model(input_ids)
    assert (adapted - base).abs().max() > 0.1
    torch._dynamo.reset()
    compile_blocks(model, "torch")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids), adapted, rtol=1e-5, atol=1e-5)
        with adapters_disabled(model):
            torch.testing.assert_close(model(input_ids), base, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(input_ids), adapted, rtol=1e-5, atol=1e-5)
