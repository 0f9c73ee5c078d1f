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
