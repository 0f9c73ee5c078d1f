"""A frozen projection and its adapter's update in one GEMM (`litft.adapters.lora_gemm`): the kernel's sum of
products equals torch's, in Triton's interpreter on CPU and compiled on the GPU; the grouped LoRA operator computes
through it the same outputs and gradients as each layer alone; operands the kernel cannot read, and shapes where
cuBLAS was faster, go through the caller's cuBLAS path."""

from __future__ import annotations

import pytest
import torch
from conftest import random_lora_model, triton_interpreter
from test_lora_projections import CONFIG, assert_computes_what_each_layer_computes_alone, lora_model, loss_and_grads

from litft.adapters import gated_activation, lora_gemm, lora_projections


@pytest.fixture
def interpreter(monkeypatch):
    with triton_interpreter(monkeypatch, lora_gemm._kernel, lora_gemm._gated_kernel, gated_activation._product_kernel):
        yield


@pytest.fixture
def kernel_runs(monkeypatch):
    """The kernel launches, recorded as they pass through to the kernel: (pairs, transposed) for a sum of
    products, ("gated", activation) for gated_projections."""
    launches = []
    run, run_gated = lora_gemm._run, lora_gemm._run_gated

    def counting(pairs, transposed, config, **variant):
        launches.append((len(pairs), transposed))
        return run(pairs, transposed, config, **variant)

    def counting_gated(*arguments):
        launches.append(("gated", arguments[4]))
        return run_gated(*arguments)

    monkeypatch.setattr(lora_gemm, "_run", counting)
    monkeypatch.setattr(lora_gemm, "_run_gated", counting_gated)
    return launches


def unreachable() -> torch.Tensor:
    raise AssertionError("the cuBLAS path ran where the kernel should have")


def forward_and_backward_operands(rows, in_features, out_features, rank, device="cpu", dtype=torch.float32):
    """A projection's forward pairs (x, W), (low, B) with low a column block of a group's (M, 3r) tensor, and an
    input gradient's pairs (dy_1, W_1), (dy_2, W_2), (g_low, sA) with dy_2 a column block of a joined gradient."""
    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    x, weight, low_group, update = randn(rows, in_features), randn(out_features, in_features), randn(rows, 3 * rank), \
        randn(out_features, rank)
    forward = [(x, weight), (low_group[:, rank : 2 * rank], update)]
    joined_grad = randn(rows, 2 * out_features)
    backward = [
        (randn(rows, out_features), weight), (joined_grad[:, out_features:], randn(out_features, in_features)),
        (randn(rows, 2 * rank), randn(2 * rank, in_features)),
    ]
    return forward, backward


def reference(pairs, transposed):
    return sum(a.double() @ (b.double().t() if transposed else b.double()) for a, b in pairs)


@pytest.mark.parametrize("rows, in_features, out_features, rank", [(300, 96, 200, 4), (130, 64, 264, 16)])
def test_the_kernel_sums_the_products_in_the_interpreter(interpreter, monkeypatch, rows, in_features, out_features,
                                                         rank, kernel_runs):
    """Shapes that are not multiples of the blocks, strided column blocks, a rank shorter than the smallest block
    (zero-padded reads), one to four pairs, both layouts of B."""
    monkeypatch.setenv("LITFT_LORA_GEMM", "triton")
    torch.manual_seed(0)
    forward, backward = forward_and_backward_operands(rows, in_features, out_features, rank)
    deep_update = [(torch.randn(rows, 80), torch.randn(out_features, 80))]  # past one block: looped, not prefetched
    four_pairs = backward[:2] + backward[:1] + backward[2:]
    cases = [(forward, True), (forward[:1], True), (backward, False), (four_pairs, False),
             (forward[:1] + deep_update, True)]
    for pairs, transposed in cases:
        assert lora_gemm.can_fuse(pairs)
        result = lora_gemm.sum_of_products(pairs, transposed, cublas=unreachable)
        torch.testing.assert_close(result.double(), reference(pairs, transposed), rtol=1e-5, atol=1e-4)
    assert kernel_runs == [(2, True), (1, True), (3, False), (4, False), (2, True)]
    # Both epilogues, the rank-deep pair looped like the others, and other tile orders (groups of one row tile, of
    # two, of more than there are) give the same sums.
    for variant in [dict(store_through_tma=True), dict(prefetch_low=False), dict(group_rows=1), dict(group_rows=2)]:
        result = lora_gemm._run(backward, False, 0, **variant)
        torch.testing.assert_close(result.double(), reference(backward, False), rtol=1e-5, atol=1e-4)


def test_the_grouped_operator_computes_through_the_kernel_what_each_layer_computes(interpreter, monkeypatch,
                                                                                  kernel_runs):
    """Every group's forward and input gradient through the kernel (q/k/v joined in one weight), and the loss and
    every adapter's gradient equal each LoRA layer computed on its own."""
    monkeypatch.setenv("LITFT_LORA_GEMM", "triton")
    model = lora_model()
    assert lora_projections.join_frozen_weights(model) > 0
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 12))
    assert_computes_what_each_layer_computes_alone(model, input_ids)
    # Per block: forward q/k/v (joined), o, gate and up with their product, down; input gradients q/k/v, o,
    # gate + up, down. The first block's q/k/v input needs no gradient.
    layers = CONFIG["num_hidden_layers"]
    assert kernel_runs.count(("gated", "silu")) == layers
    assert sum(transposed is True for _, transposed in kernel_runs) == 3 * layers
    assert [count for count, transposed in kernel_runs if transposed is False] == \
        [2, 3, 2, 2] * (layers - 1) + [2, 3, 2]


def gated_operands(rows, in_features, out_features, rank, device="cpu", dtype=torch.float32):
    """x, [W_gate; W_up] (2N, K), [low_gate | low_up] (M, 2r), (B_gate, B_up)."""
    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    return (randn(rows, in_features), randn(2 * out_features, in_features), randn(rows, 2 * rank),
            (randn(out_features, rank), randn(out_features, rank)))


def gated_reference(x, weights, low, updates, activation):
    """gate, up in float64, and h from gate and up as rounded to x's dtype (as both paths form it)."""
    rank = updates[0].shape[1]
    gate, up = (reference([(x, weight), (low_i, update)], True)
                for weight, low_i, update in zip(weights.chunk(2), low.split(rank, dim=1), updates))
    rounded_gate, rounded_up = gate.to(x.dtype).double(), up.to(x.dtype).double()
    if activation == "gelu_tanh":
        return gate, up, torch.nn.functional.gelu(rounded_gate, approximate="tanh") * rounded_up
    return gate, up, torch.nn.functional.silu(rounded_gate) * rounded_up


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("rows, in_features, out_features, rank", [(300, 96, 200, 4), (130, 64, 264, 16)])
def test_gated_projections_in_the_interpreter(interpreter, monkeypatch, activation, rows, in_features,
                                              out_features, rank, kernel_runs):
    """gate, up and h = act(gate) * up from one kernel: tiles that fill no whole block, a rank shorter than the
    smallest block."""
    monkeypatch.setenv("LITFT_LORA_GEMM", "triton")
    torch.manual_seed(0)
    operands = gated_operands(rows, in_features, out_features, rank)
    gate, up, product = lora_gemm.gated_projections(*operands, activation, separately=unreachable)
    for got, expected in zip((gate, up, product), gated_reference(*operands, activation)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    assert kernel_runs == [("gated", activation)]
    tokens = 1 << (rows - 1).bit_length()
    assert lora_gemm.choices()[-1].startswith(f"gate and up forward, {activation} product, {tokens} tokens")


def test_gated_projections_the_kernel_cannot_take_go_separately(interpreter, monkeypatch, kernel_runs):
    """Weights that are not gate's and up's of one width, ranks past one block, cuBLAS forced, or a launch-bound
    token count under `auto`: the caller's own computation."""
    x, weights, low, updates = gated_operands(64, 32, 48, 4)
    computed = (x, x, x)
    monkeypatch.setenv("LITFT_LORA_GEMM", "triton")
    for operands in [(x, weights[:88], low, updates), (x, weights, torch.randn(64, 80), (torch.randn(48, 40),) * 2)]:
        assert lora_gemm.gated_projections(*operands, "silu", separately=lambda: computed) is computed
    monkeypatch.setenv("LITFT_LORA_GEMM", "cublas")
    assert lora_gemm.gated_projections(x, weights, low, updates, "silu", separately=lambda: computed) is computed
    monkeypatch.setenv("LITFT_LORA_GEMM", "auto")
    assert lora_gemm.gated_projections(x, weights, low, updates, "silu", separately=lambda: computed) is computed
    assert kernel_runs == []


def test_a_four_bit_base_computes_gate_and_up_through_the_kernel(interpreter, monkeypatch, kernel_runs):
    """NF4 gate and up dequantize into one buffer, which the gate-and-up kernel reads as their weights laid back to
    back: the loss and every adapter's gradient equal each LoRA layer computed on its own."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("LITFT_LORA_GEMM", "triton")
    model = random_lora_model(CONFIG, quantize="bnb.nf4")
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 12))
    assert_computes_what_each_layer_computes_alone(model, input_ids)
    assert kernel_runs.count(("gated", "silu")) == CONFIG["num_hidden_layers"]


def test_operands_the_kernel_cannot_read_take_the_cublas_path(interpreter, monkeypatch, kernel_runs):
    monkeypatch.setenv("LITFT_LORA_GEMM", "triton")
    forward, _ = forward_and_backward_operands(64, 32, 48, 4)
    (x, weight), (low, update) = forward
    misaligned = torch.randn(64, 33)[:, 1:]  # starts 4 bytes into its storage; TMA needs 16
    odd_rows = torch.randn(64, 34)[:, :32]  # rows 136 bytes apart
    columns_apart = torch.randn(32, 64).t()  # its rows are not contiguous
    for pairs in ([(misaligned, weight)], [(odd_rows, weight)], [(columns_apart, weight)],
                  [(x.double(), weight.double())],
                  [(x, weight), (low, update)] * 3, [(torch.randn(64, 80), torch.randn(48, 80))] * 4):
        assert not lora_gemm.can_fuse(pairs)
        torch.testing.assert_close(lora_gemm.sum_of_products(pairs, True, cublas=lambda: x), x)
    monkeypatch.setenv("LITFT_LORA_GEMM", "cublas")
    assert lora_gemm.sum_of_products(forward, True, cublas=lambda: x) is x
    monkeypatch.setenv("LITFT_LORA_GEMM", "auto")  # 64 rows: launch-bound, never timed
    assert lora_gemm.sum_of_products(forward, True, cublas=lambda: x) is x
    assert kernel_runs == []
    assert not lora_gemm.can_fuse([(x[:0], weight)])  # no rows: nothing to launch
    with pytest.raises(ValueError, match="do not make one"):
        lora_gemm.sum_of_products([(x, weight), (low, update.t())], True, cublas=lambda: x)
    monkeypatch.setenv("LITFT_LORA_GEMM", "fast")
    with pytest.raises(ValueError, match="LITFT_LORA_GEMM='fast'"):
        lora_gemm.sum_of_products(forward, True, cublas=lambda: x)


def test_a_timing_is_kept_per_width_and_token_count_rounded_up():
    """Batches of 3,000 and 4,096 tokens share a timing, 4,097 tokens have their own, and so do other widths and the
    other layout."""
    def pairs(rows, width=64):
        return [(torch.empty(rows, width), torch.empty(48, width)), (torch.empty(rows, 16), torch.empty(48, 16))]

    key = lora_gemm.choice_key
    assert key(pairs(3000), True) == key(pairs(4096), True)
    keys = {key(pairs(4096), True), key(pairs(4097), True), key(pairs(4096, 32), True), key(pairs(4096), False)}
    assert len(keys) == 4


def test_auto_keeps_one_choice_per_kind_of_call_and_reports_it(interpreter, monkeypatch, kernel_runs):
    """In the interpreter `auto` takes the kernel untimed (the GPU test times it); a second batch of another token
    count in the same power-of-two bucket reuses the choice, and `choices()` names it; a forced kernel finds its
    configuration once; deterministic algorithms take cuBLAS."""
    monkeypatch.setenv("LITFT_LORA_GEMM", "auto")
    monkeypatch.setattr(lora_gemm, "_choices", {})
    for rows in (1100, 1500):
        forward, _ = forward_and_backward_operands(rows, 32, 48, 8)
        torch.testing.assert_close(lora_gemm.sum_of_products(forward, True, cublas=unreachable).double(),
                                   reference(forward, True), rtol=1e-5, atol=1e-4)
    assert len(kernel_runs) == 2 and len(lora_gemm._choices) == 1
    assert lora_gemm.choices() == ["forward 2048 tokens, (K, N) [(32, 48), (8, 48)]: kernel 128x256x64x3x8"]
    monkeypatch.setenv("LITFT_LORA_GEMM", "triton")  # forced: the configuration that compiles is found once
    searches = []
    search = lora_gemm._first_that_compiles
    monkeypatch.setattr(lora_gemm, "_first_that_compiles", lambda *args: searches.append(1) or search(*args))
    for _ in range(2):
        lora_gemm.sum_of_products(forward, True, cublas=unreachable)
    assert len(searches) == 1 and len(kernel_runs) == 4 and len(lora_gemm._choices) == 2
    monkeypatch.setenv("LITFT_LORA_GEMM", "auto")
    torch.use_deterministic_algorithms(True)  # a run that must repeat bit for bit: no timing decides its path
    try:
        assert lora_gemm.sum_of_products(forward, True, cublas=lambda: forward[0][0]) is forward[0][0]
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(kernel_runs) == 4


def test_no_kernel_runs_on_cpu_without_the_interpreter(monkeypatch, kernel_runs):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("LITFT_LORA_GEMM", "triton")
    forward, _ = forward_and_backward_operands(64, 32, 48, 4)
    assert not lora_gemm.can_fuse(forward)
    model = lora_model()
    assert_computes_what_each_layer_computes_alone(model, torch.randint(0, CONFIG["vocab_size"], (2, 12)))
    assert kernel_runs == []


@pytest.mark.gpu
def test_on_the_gpu_the_kernel_rounds_the_sum_once_and_auto_keeps_its_choice(monkeypatch, kernel_runs):
    """bf16 at a shape where tiles are full and partial: the kernel's error against a float64 reference is no
    larger than cuBLAS's two GEMMs' (the kernel rounds once, cuBLAS rounds the update first); `auto` times both
    paths once per shape, keeps its choice, and gives a result within bf16 rounding of the reference either way."""
    torch.manual_seed(0)
    forward, backward = forward_and_backward_operands(2048 + 64, 1024, 3072 + 128, 16, "cuda", torch.bfloat16)
    for pairs, transposed in [(forward, True), (backward, False)]:
        monkeypatch.setenv("LITFT_LORA_GEMM", "triton")
        exact = reference(pairs, transposed)
        fused = lora_gemm.sum_of_products(pairs, transposed, cublas=unreachable)

        def cublas():
            first, *rest = pairs
            out = rest[-1][0] @ (rest[-1][1].t() if transposed else rest[-1][1])
            for a, b in [first, *rest[:-1]]:
                out.addmm_(a, b.t() if transposed else b)
            return out

        two_gemms = cublas()
        fused_error = (fused.double() - exact).norm() / exact.norm()
        cublas_error = (two_gemms.double() - exact).norm() / exact.norm()
        assert fused_error <= cublas_error * 1.05, (fused_error, cublas_error)
        monkeypatch.setenv("LITFT_LORA_GEMM", "auto")
        lora_gemm._choices.clear()
        with _sync_debug("error"):
            chosen = lora_gemm.sum_of_products(pairs, transposed, cublas=cublas)
        assert len(lora_gemm._choices) == 1
        choice = next(iter(lora_gemm._choices.values()))
        before = len(kernel_runs)
        again = lora_gemm.sum_of_products(pairs, transposed, cublas=cublas)
        assert len(kernel_runs) - before == (choice != lora_gemm.CUBLAS)  # one call, no timing the second time
        for result in (chosen, again):
            assert (result.double() - exact).norm() / exact.norm() < 4e-3


@pytest.mark.gpu
def test_on_the_gpu_gated_projections_round_as_the_separate_path(monkeypatch, kernel_runs):
    """bf16 at a shape with full and partial tiles: the kernel's gate, up and h are no further from a float64
    reference than the separate path's (cuBLAS's GEMMs, then the elementwise product), and `auto` keeps a
    choice."""
    torch.manual_seed(0)
    operands = gated_operands(2048 + 64, 1024, 3072 + 64, 16, "cuda", torch.bfloat16)
    exact = gated_reference(*operands, "silu")
    x, weights, low, updates = operands

    def separately():
        gate, up = ((low_i @ update.t()).addmm_(x, weight.t())
                    for weight, low_i, update in zip(weights.chunk(2), low.split(16, dim=1), updates))
        return gate, up, gated_activation.gated_product(gate, up, "silu")

    monkeypatch.setenv("LITFT_LORA_GEMM", "triton")
    fused = lora_gemm.gated_projections(*operands, "silu", separately=unreachable)
    apart = separately()
    bounds = []
    for got, other, truth in zip(fused, apart, exact):
        fused_error = (got.double() - truth).norm() / truth.norm()
        apart_error = (other.double() - truth).norm() / truth.norm()
        assert fused_error <= apart_error * 1.05 + 1e-4, (fused_error, apart_error)
        bounds.append(max(fused_error, apart_error) * 1.05 + 1e-4)
    monkeypatch.setenv("LITFT_LORA_GEMM", "auto")
    lora_gemm._choices.clear()
    with _sync_debug("error"):
        chosen = lora_gemm.gated_projections(*operands, "silu", separately=separately)
    assert len(lora_gemm._choices) == 1
    # Whichever path `auto` kept (the host decides), its results are one of the two just checked.
    for got, truth, bound in zip(chosen, exact, bounds):
        assert (got.double() - truth).norm() / truth.norm() <= bound


class _sync_debug:
    """torch.cuda.set_sync_debug_mode for a block: the one-time timing must not trip a step that never waits."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __enter__(self):
        self.previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(self.mode)

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.previous)


@pytest.mark.gpu
def test_on_the_gpu_a_training_step_through_the_kernel_matches_the_cublas_path(monkeypatch, kernel_runs):
    """bf16 (the kernel's dtypes): the loss and every adapter's gradient through the kernel are those of the cuBLAS
    path within bf16's rounding."""
    model = lora_model(torch.bfloat16, config={"hidden_size": 128, "intermediate_size": 384}, rank=8).cuda()
    lora_projections.join_frozen_weights(model)
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, 64), device="cuda")
    results = {}
    for path in ("triton", "cublas"):
        monkeypatch.setenv("LITFT_LORA_GEMM", path)
        results[path] = loss_and_grads(model, input_ids)
    assert len(kernel_runs) == 4 * CONFIG["num_hidden_layers"] + 4 * CONFIG["num_hidden_layers"] - 1
    (loss, grads), (reference_loss, reference_grads) = results["triton"], results["cublas"]
    torch.testing.assert_close(loss, reference_loss, rtol=1e-2, atol=0)
    for name, grad in grads.items():
        error = (grad.float() - reference_grads[name].float()).norm() / reference_grads[name].float().norm()
        assert error < 2e-2, (name, error)
