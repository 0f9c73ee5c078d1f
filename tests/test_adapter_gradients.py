"""Both adapter gradients of a projection from one read of its output gradient (`litft.adapters.adapter_gradients`):
the kernel's (grad @ update, grad.t() @ low) equal the float32 matmuls, in Triton's interpreter on CPU and compiled
on the GPU; partial sums over several row and column groups, padded ranks, ragged edges and strided operands;
the same bits every run; operands it does not take, and CPU tensors without the interpreter, go through torch."""

from __future__ import annotations

import pytest
import torch
from conftest import triton_interpreter

from litft.adapters import adapter_gradients as module
from litft.adapters.adapter_gradients import (
    SMALLEST_KERNEL_COLUMNS,
    Plan,
    adapter_gradients,
    fused_adapter_gradients,
    plan,
    uses_kernel,
)

# M and N are no multiple of the small blocks below: 300 rows = 9 blocks of 32 and one of 12, 200 columns = 3
# blocks of 64 and one of 8; 3 row groups of 4, 4 and 2 row blocks.
ROWS, COLUMNS = 300, 200
SMALL_BLOCKS = dict(block_rows=32, block_columns=64, row_groups=3)


@pytest.fixture
def interpreter(monkeypatch):
    with triton_interpreter(monkeypatch, module._kernels):
        monkeypatch.setattr(module, "_does_not_fit", set())
        yield


@pytest.fixture
def launches(monkeypatch):
    """The kernel launches `adapter_gradients` makes, counted as they pass through."""
    calls = []
    fused = module.fused_adapter_gradients

    def counting(grad, update, low, **config):
        calls.append(tuple(grad.shape))
        return fused(grad, update, low, **config)

    monkeypatch.setattr(module, "fused_adapter_gradients", counting)
    return calls


def operands(rank, dtype, rows=ROWS, columns=COLUMNS, device="cpu", seed=0):
    """grad a column block of a wider gradient (as q/k/v's joined gradient splits), low a column block of the
    group's (M, 3r) forward input, update a transposed view (neither of its strides is 1 along the rank)."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    joined = randn(rows, columns + 96)
    grad = joined.split([64, columns, 32], dim=1)[1]
    update = randn(rank, columns).t()
    low = randn(rows, 3 * rank)[:, rank : 2 * rank]
    return grad, update, low


def reference(grad, update, low):
    return grad.float() @ update.float(), grad.float().t() @ low.float()


def assert_close_to_reference(results, grad, update, low):
    """float32: the float32 matmuls' sums in another order; 16-bit: those sums rounded once (torch rounds the
    kernel's float32 sums to nearest), within half a unit in the last place: 2**-8 relative at most."""
    rtol, atol = (1e-5, 1e-4) if grad.dtype == torch.float32 else (2**-8, 1e-4)
    for result, expected, shape in zip(results, reference(grad, update, low),
                                       [(grad.shape[0], update.shape[1]), (grad.shape[1], update.shape[1])]):
        assert result.dtype == grad.dtype and result.shape == shape
        torch.testing.assert_close(result.float(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("rank", [4, 16, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_sums_both_products_over_several_groups(interpreter, dtype, rank):
    """Ranks below tl.dot's 16 and not a power of two (padded with zeros), ragged last blocks of rows and columns,
    a last row group shorter than the others, strided operands."""
    grad, update, low = operands(rank, dtype)
    assert grad.stride(0) > grad.shape[1] and uses_kernel(grad, update, low)
    split = plan(ROWS, COLUMNS, rank, grad.element_size(), 4, block_rows=32, block_columns=64, row_groups=3)
    assert split == Plan(row_groups=3, column_groups=4, rows_per_program=128)
    assert_close_to_reference(fused_adapter_gradients(grad, update, low, **SMALL_BLOCKS), grad, update, low)


def test_the_public_function_runs_the_kernel_with_its_defaults(interpreter, launches):
    """Contiguous operands, the default blocks (one column group of 512, the row groups the plan makes for the
    interpreter's 4 'multiprocessors')."""
    generator = torch.Generator().manual_seed(1)
    grad, update, low = (torch.randn(*shape, generator=generator).to(torch.bfloat16)
                         for shape in [(ROWS, COLUMNS), (COLUMNS, 8), (ROWS, 8)])
    assert plan(ROWS, COLUMNS, 8, 2, 4).row_groups > 1
    assert_close_to_reference(adapter_gradients(grad, update, low), grad, update, low)
    assert launches == [(ROWS, COLUMNS)]


def test_the_same_bits_every_run(interpreter):
    grad, update, low = operands(16, torch.bfloat16, seed=2)
    first = fused_adapter_gradients(grad, update, low, **SMALL_BLOCKS)
    second = fused_adapter_gradients(grad, update, low, **SMALL_BLOCKS)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_partial_sums_add_the_groups_in_order_in_one_launch(interpreter, dtype):
    """One partial or two (the kernel's pair, of different sizes, neither a whole number of summing blocks): each
    summed over its groups first to last in float32, then rounded once, as a sequential loop does it."""
    generator = torch.Generator().manual_seed(3)
    partials = [torch.randn(7, 300, 5, generator=generator) * 1e3, torch.randn(3, 2100, 16, generator=generator)]
    assert all(partial[0].numel() % module.SUM_BLOCK for partial in partials)

    def in_order(partial):
        total = partial[0].clone()
        for group in partial[1:]:
            total += group
        return total.to(dtype)

    for chosen in ([partials[0]], partials):
        summed = module.summed_partials(chosen, dtype)
        assert [tuple(result.shape) for result in summed] == [tuple(partial.shape[1:]) for partial in chosen]
        for result, partial in zip(summed, chosen):
            assert result.dtype == dtype and torch.equal(result, in_order(partial))


def test_without_the_interpreter_cpu_tensors_take_the_torch_matmuls(monkeypatch, launches):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for dtype in (torch.float32, torch.bfloat16):
        grad, update, low = operands(16, dtype)
        assert not uses_kernel(grad, update, low)
        grad_low, grad_update = adapter_gradients(grad, update, low)
        assert torch.equal(grad_low, grad @ update) and torch.equal(grad_update, grad.t() @ low)
    assert launches == []


def test_operands_the_kernel_does_not_take_go_through_torch(interpreter, launches):
    grad, update, low = operands(16, torch.float32)
    cases = {
        "rank above 64": (grad, torch.randn(COLUMNS, 80), torch.randn(ROWS, 80)),
        "rows not contiguous": (torch.randn(COLUMNS, ROWS).t(), update, low),
        "float64": (grad.double(), update.double(), low.double()),
        "no rows": (grad[:0], update, low[:0]),
    }
    for name, (g, u, x) in cases.items():
        assert not uses_kernel(g, u, x), name
        grad_low, grad_update = adapter_gradients(g, u, x)
        assert torch.equal(grad_low, g @ u) and torch.equal(grad_update, g.t() @ x), name
    assert not uses_kernel(grad, update.bfloat16(), low)  # mixed dtypes
    assert launches == []
    with pytest.raises(ValueError, match="are not"):
        adapter_gradients(grad, update[:, :8], low)
    with pytest.raises(ValueError, match="power of two"):
        fused_adapter_gradients(grad, update, low, block_rows=24)


def test_a_configuration_too_large_for_the_gpu_falls_back_and_is_remembered(interpreter, monkeypatch):
    class OutOfResources(Exception):  # triton's name for a launch beyond the shared memory or registers
        pass

    attempts = []

    def too_large(*args, **config):
        attempts.append(1)
        raise OutOfResources("out of resource: shared memory")

    monkeypatch.setattr(module, "fused_adapter_gradients", too_large)
    grad, update, low = operands(16, torch.float32)
    for _ in range(2):
        grad_low, grad_update = adapter_gradients(grad, update, low)
        assert torch.equal(grad_low, grad @ update) and torch.equal(grad_update, grad.t() @ low)
    assert len(attempts) == 1 and not uses_kernel(grad, update, low)
    monkeypatch.setattr(module, "fused_adapter_gradients", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # any other error is the caller's to see (bf16: not remembered as too large)
        adapter_gradients(*operands(16, torch.bfloat16))


def test_the_plan_at_llama_8b_sizes():
    """On an H200 (132 multiprocessors), rank 16, bf16: one wave of programs (at most two per multiprocessor) and
    partial sums a small share of the gradient's bytes; a narrow gradient's row groups held by the share."""
    grad_bytes = 8192 * 14336 * 2
    split = plan(8192, 14336, 16, 2, 132)
    assert split == Plan(row_groups=9, column_groups=28, rows_per_program=928) and split.programs == 252
    low_partial, update_partial = (groups * size * 16 * 4 for groups, size in [(28, 8192), (9, 14336)])
    assert low_partial / grad_bytes == 1 / 16 and update_partial / grad_bytes < 0.04
    narrow = plan(8192, 1024, 16, 2, 132)
    assert narrow.column_groups == 2 and narrow.row_groups * 1024 * 16 * 4 <= 8192 * 1024 * 2 / 8


@pytest.mark.gpu
def test_on_the_gpu_at_llama_8b_size_the_error_is_no_larger_than_torchs():
    """llama-8b's MLP gradient (8192 x 14336, bf16, rank 16) and a block of the joined q/k/v gradient: the kernel's
    error against float32 matmuls is no larger than torch's bf16 matmuls' own (both round a float32 sum once:
    only the summation order differs), and two runs give the same bits."""
    for columns, joined in [(14336, None), (1024, 6144)]:
        generator = torch.Generator(device="cuda").manual_seed(0)
        wide = torch.randn(8192, joined or columns, generator=generator, device="cuda").to(torch.bfloat16)
        grad = wide[:, 4096 : 4096 + columns] if joined else wide
        update = (torch.randn(columns, 16, generator=generator, device="cuda") * 0.02).to(torch.bfloat16)
        low = torch.randn(8192, 16, generator=generator, device="cuda").to(torch.bfloat16)
        # The joined block is narrower than what takes the kernel on a GPU by default: run the kernel directly.
        assert uses_kernel(grad, update, low) == (columns >= SMALLEST_KERNEL_COLUMNS)
        fused = fused_adapter_gradients(grad, update, low)
        assert all(torch.equal(a, b) for a, b in zip(fused, fused_adapter_gradients(grad, update, low)))
        for result, through_torch, exact in zip(fused, (grad @ update, grad.t() @ low), reference(grad, update, low)):
            fused_error = (result.float() - exact).norm() / exact.norm()
            torch_error = (through_torch.float() - exact).norm() / exact.norm()
            assert fused_error <= torch_error * 1.01, (columns, fused_error, torch_error)
