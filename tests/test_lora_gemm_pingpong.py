"""The warp-specialized LoRA GEMMs (`litft.adapters.lora_gemm_pingpong`, Gluon, Hopper only): the same sums and
gated outputs as `lora_gemm`'s Triton kernel, no further from a float64 reference, at shapes with partial tiles,
several rank widths, views of wider tensors, one or two long pairs with and without a rank-deep one; `auto`'s use
of it. GPU only: Gluon has no interpreter."""

from __future__ import annotations

import pytest
import torch
from test_lora_gemm import forward_and_backward_operands, gated_operands, gated_reference, reference

from litft.adapters import lora_gemm, lora_gemm_pingpong

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not lora_gemm_pingpong.available(torch.device("cuda")),
                       reason="needs a Hopper GPU and Triton's Gluon"),
]


def relative_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    return ((got.double() - truth).norm() / truth.norm()).item()


@pytest.mark.parametrize("rows, in_features, out_features, rank", [
    (2048 + 64, 1024, 3072 + 128, 16),  # full and partial tiles
    (300, 256, 384, 8),  # a rank below the smallest block; fewer tiles than programs
    (1100, 640, 1024 + 64, 24),  # ranks between blocks (24 and 48)
])
def test_sums_of_products_as_exact_as_the_triton_kernel(rows, in_features, out_features, rank):
    torch.manual_seed(0)
    forward, backward = forward_and_backward_operands(rows, in_features, out_features, rank, "cuda", torch.bfloat16)
    for pairs, transposed in [(forward, True), (backward, False), (backward[:2], False), (forward[:1], True)]:
        exact = reference(pairs, transposed)
        got = lora_gemm_pingpong.sum_of_products(pairs, transposed)
        triton = lora_gemm._run(pairs, transposed, 0)
        assert got.shape == exact.shape and got.dtype == torch.bfloat16
        assert relative_error(got, exact) <= relative_error(triton, exact) * 1.05 + 1e-5, \
            (rows, transposed, len(pairs), relative_error(got, exact), relative_error(triton, exact))


def test_the_same_result_on_every_call():
    """The turns of the two warp groups and the ring's phases carry across tiles: a run of calls (some tiles
    landing on each group, each stage reused many times) gives the same bits every time."""
    torch.manual_seed(0)
    forward, _ = forward_and_backward_operands(4096, 2048, 4096, 16, "cuda", torch.bfloat16)
    first = lora_gemm_pingpong.sum_of_products(forward, True)
    for _ in range(5):
        assert torch.equal(lora_gemm_pingpong.sum_of_products(forward, True), first)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("rows, in_features, out_features, rank", [
    (2048 + 64, 1024, 3072 + 64, 16), (300, 256, 200 + 8, 4),
])
def test_gated_projections_as_exact_as_the_triton_kernel(activation, rows, in_features, out_features, rank):
    torch.manual_seed(0)
    x, weights, low, updates = gated_operands(rows, in_features, out_features, rank, "cuda", torch.bfloat16)
    exact = gated_reference(x, weights, low, updates, activation)
    blocks = torch.block_diag(*updates)
    got = lora_gemm_pingpong.gated_projections(x, weights, low, blocks, activation)
    triton = lora_gemm._run_gated(x, weights, low, blocks, activation, 0)
    for name, mine, theirs, truth in zip(("gate", "up", "h"), got, triton, exact):
        assert mine.shape == truth.shape
        assert relative_error(mine, truth) <= relative_error(theirs, truth) * 1.05 + 1e-4, \
            (name, relative_error(mine, truth), relative_error(theirs, truth))


def cublas_pair(pairs, transposed):
    def compute():
        *base, (low, update) = pairs
        out = low @ (update.t() if transposed else update)
        for a, b in base:
            out.addmm_(a, b.t() if transposed else b)
        return out

    return compute


def test_auto_times_the_kernel_only_for_short_reductions(monkeypatch):
    """`auto` times the warp-specialized kernel beside cuBLAS and the Triton kernel where the long reduction is at
    most WARP_SPECIALIZED_DEEPEST deep, and leaves it out past that (where its narrower tiles lose)."""
    monkeypatch.setenv("LITFT_LORA_GEMM", "auto")
    torch.manual_seed(0)
    deepest = lora_gemm.WARP_SPECIALIZED_DEEPEST
    for depth, timed in [(deepest, True), (deepest + 1024, False)]:
        lora_gemm._choices.clear()
        lora_gemm._timings.clear()
        forward, _ = forward_and_backward_operands(2048, depth, 1024, 16, "cuda", torch.bfloat16)
        result = lora_gemm.sum_of_products(forward, True, cublas=cublas_pair(forward, True))
        (timings,) = lora_gemm._timings.values()
        assert (lora_gemm.WARP_SPECIALIZED in timings) is timed, (depth, timings)
        exact = reference(forward, True)
        assert relative_error(result, exact) < 4e-3


def test_auto_goes_on_without_the_kernel_where_it_fails(monkeypatch):
    """A kernel that does not compile (another Triton's Gluon) costs a warning, not the run: `auto` keeps one of
    the other paths."""
    monkeypatch.setenv("LITFT_LORA_GEMM", "auto")
    lora_gemm._choices.clear()

    def failing(*arguments):
        raise RuntimeError("the kernel did not compile")

    monkeypatch.setattr(lora_gemm_pingpong, "sum_of_products", failing)
    torch.manual_seed(0)
    forward, _ = forward_and_backward_operands(2048, 1024, 1024, 16, "cuda", torch.bfloat16)
    with pytest.warns(UserWarning, match="warp-specialized LoRA GEMM failed"):
        result = lora_gemm.sum_of_products(forward, True, cublas=cublas_pair(forward, True))
    assert next(iter(lora_gemm._choices.values())) != lora_gemm.WARP_SPECIALIZED
    assert relative_error(result, reference(forward, True)) < 4e-3


def activation_backward_operands(rows, depth, columns, rank, strided_gate_up):
    """dy (M, D), W (D, N), g_low (M, r), sA (r, N), gate and up (M, N): halves of one (M, 2N) output where
    `strided_gate_up` (a fused gate_up projection's), else tensors of their own; bf16 on the GPU."""
    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    if strided_gate_up:
        gate, up = randn(rows, 2 * columns).chunk(2, dim=1)
    else:
        gate, up = randn(rows, columns), randn(rows, columns)
    return randn(rows, depth), randn(depth, columns) / depth**0.5, randn(rows, rank), randn(rank, columns), gate, up


def activation_backward_reference(grad_output, weight, grad_low, lora_a, gate, up, activation):
    """d gate, d up, g_low^T @ h in float64, from the exact d h, and h from gate and up as rounded (bf16)."""
    grad_product = grad_output.double() @ weight.double() + grad_low.double() @ lora_a.double()
    gate, up = gate.double(), up.double()
    if activation == "gelu_tanh":
        tanh = torch.tanh(0.7978845608028654 * (gate + 0.044715 * gate**3))
        value = 0.5 * gate * (1 + tanh)
        slope = 0.5 * (1 + tanh) + 0.5 * gate * (1 - tanh**2) * 0.7978845608028654 * (1 + 3 * 0.044715 * gate**2)
    else:
        sigmoid = torch.sigmoid(gate)
        value, slope = gate * sigmoid, sigmoid * (1 + gate * (1 - sigmoid))
    product = (value * up).to(torch.bfloat16).double()
    return grad_product * up * slope, grad_product * value, grad_low.double().t() @ product


def is_activation_backward(key: tuple) -> bool:
    return len(key) > 6 and key[5].startswith(lora_gemm.ACTIVATION_BACKWARD_LABEL)


def activation_backward_apart(grad_output, weight, grad_low, lora_a, gate, up, activation):
    """What the epilogue replaces: d h through the Triton kernel, written out, then the activation's backward."""
    from litft.adapters import lora_gated_down

    grad_product = lora_gemm._run([(grad_output, weight), (grad_low, lora_a)], False, 0)
    return lora_gated_down.gated_backward(grad_product, gate, up, grad_low, activation)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("rows, depth, columns, rank, strided_gate_up", [
    (2048 + 64, 1024, 3072 + 128, 16, False),  # full and partial row tiles
    (300, 256, 200, 8, True),  # a partial column tile, fewer tiles than programs, gate and up as halves
    (1100, 640, 1024 + 64, 24, False),  # a rank between blocks
    (1024, 512, 512, 48, True),  # the widest rank block
])
def test_activation_backward_in_the_epilogue_as_exact_as_apart(activation, rows, depth, columns, rank,
                                                               strided_gate_up):
    """d gate, d up and the adapter's A gradient from the kernel whose epilogue does the activation's backward are no
    further from float64 than the two kernels it replaces; the partials are one per row tile."""
    torch.manual_seed(0)
    operands = activation_backward_operands(rows, depth, columns, rank, strided_gate_up)
    exact = activation_backward_reference(*operands, activation)
    grad_gate, grad_up, partials = lora_gemm_pingpong.gated_input_gradient(*operands, activation)
    assert partials.shape == (-(-rows // lora_gemm_pingpong.BLOCK_M), rank, columns)
    apart = activation_backward_apart(*operands, activation)
    for name, mine, theirs, truth in zip(("d gate", "d up", "d A"), (grad_gate, grad_up, partials.sum(0)), apart,
                                         exact):
        assert mine.shape == truth.shape, name
        assert relative_error(mine, truth) <= relative_error(theirs, truth) * 1.05 + 1e-4, \
            (name, relative_error(mine, truth), relative_error(theirs, truth))


def test_activation_backward_gives_the_same_bits_on_every_call():
    torch.manual_seed(0)
    operands = activation_backward_operands(4096, 1024, 2048, 16, False)
    first = lora_gemm_pingpong.gated_input_gradient(*operands, "silu")
    for _ in range(3):
        for got, expected in zip(lora_gemm_pingpong.gated_input_gradient(*operands, "silu"), first):
            assert torch.equal(got, expected)


@pytest.mark.parametrize("setting, path", [("auto", None), ("warp_specialized", lora_gemm.WARP_SPECIALIZED),
                                           ("triton", lora_gemm.CUBLAS)])
def test_activation_backward_is_timed_against_the_two_kernels(monkeypatch, setting, path):
    """`auto` times the epilogue's kernel against the two kernels it replaces (its line in `choices()` names both);
    LITFT_LORA_GEMM forces one. Either way the gradients are the exact ones, to bf16's accuracy."""
    monkeypatch.setenv("LITFT_LORA_GEMM", setting)
    lora_gemm._choices.clear()
    lora_gemm._timings.clear()
    torch.manual_seed(0)
    grad_output, weight, grad_low, lora_a, gate, up = activation_backward_operands(2048, 1024, 2048, 16, False)
    weights_made = []

    def frozen_weight():
        weights_made.append(True)
        return weight

    got = lora_gemm.gated_input_gradient(
        grad_output, frozen_weight, grad_low, lora_a, gate, up, "silu",
        lambda: activation_backward_apart(grad_output, weight, grad_low, lora_a, gate, up, "silu"))
    exact = activation_backward_reference(grad_output, weight, grad_low, lora_a, gate, up, "silu")
    for mine, truth in zip(got, exact):
        assert relative_error(mine, truth) < 1e-2
    (key,) = [key for key in lora_gemm._choices if is_activation_backward(key)]
    if path is None:
        assert set(lora_gemm._timings[key]) == {lora_gemm.CUBLAS, lora_gemm.WARP_SPECIALIZED}
        (line,) = [line for line in lora_gemm.choices() if lora_gemm.ACTIVATION_BACKWARD_LABEL in line]
        assert "apart" in line and "warp-specialized kernel" in line, line
    else:
        assert lora_gemm._choices[key] == path and bool(weights_made) is (path == lora_gemm.WARP_SPECIALIZED)


def test_llama_mlp_backward_through_the_epilogue_as_exact_as_the_two_kernels(monkeypatch):
    """A bf16 LoRA Llama whose gated down projections' backward runs through the epilogue's kernel has gradients no
    further from the float32 model's than with the two kernels it replaces."""
    import copy

    from conftest import random_lora_model, square_loss_and_grads

    config = {
        "model_type": "llama", "vocab_size": 256, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False,
    }
    torch.manual_seed(0)
    exact_model = random_lora_model(config, rank=8, alpha=16).to("cuda")
    model = copy.deepcopy(exact_model).to(torch.bfloat16)
    input_ids = torch.randint(0, config["vocab_size"], (2, 256), device="cuda")
    _, exact_grads = square_loss_and_grads(exact_model, input_ids)  # float32: cuBLAS, no fused kernel
    errors = {}
    for setting, path in (("warp_specialized", lora_gemm.WARP_SPECIALIZED), ("triton", lora_gemm.CUBLAS)):
        monkeypatch.setenv("LITFT_LORA_GEMM", setting)
        lora_gemm._choices.clear()
        _, grads = square_loss_and_grads(model, input_ids)
        chosen = [choice for key, choice in lora_gemm._choices.items() if is_activation_backward(key)]
        assert chosen == [path], (setting, chosen)  # the gated down projections' backward, one kind of call
        errors[setting] = {name: relative_error(grad, exact_grads[name].double()) for name, grad in grads.items()}
    for name, error in errors["warp_specialized"].items():
        assert error <= 1.25 * errors["triton"][name] + 1e-3, (name, error, errors["triton"][name])
