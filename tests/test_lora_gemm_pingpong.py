"""The warp-specialized LoRA GEMMs (`litft.adapters.lora_gemm_pingpong`, Gluon, Hopper only): the same sums and
gated outputs as `lora_gemm`'s Triton kernel, no further from a float64 reference, at shapes with partial tiles,
several rank widths, views of wider tensors and three long pairs. GPU only: Gluon has no interpreter."""

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
