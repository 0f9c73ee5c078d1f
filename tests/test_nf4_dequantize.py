"""litft's one-kernel NF4 dequantization (litft/adapters/nf4_dequantize.py): the same values as bitsandbytes'.

On CPU the kernel runs in Triton's interpreter and is compared with a plain-torch statement of the format, which is
itself checked against bitsandbytes (float32 output, where its CPU code computes as its CUDA kernel does); the
interpreter rounds float32 to bfloat16 by truncation, so bfloat16 is compared on the GPU, bit for bit, with
bitsandbytes' CUDA kernels."""

from __future__ import annotations

import pytest
import torch
from conftest import triton_interpreter

from litft.adapters import nf4_dequantize, quantization

bnb_functional = pytest.importorskip("bitsandbytes.functional")

# Shapes: one program's bytes and less, a partial last program, absmax counts that are not a multiple of the nested
# block (256 scales), more than one nested block.
SHAPES = [(64, 256), (96, 200), (33, 64), (20, 4100), (130, 512)]


def quantize(shape, double_quant: bool, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(*shape, generator=generator).to(device=device, dtype=torch.bfloat16)
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.bfloat16
    )
    tensors = [state.absmax, state.state2.absmax, state.state2.code, state.offset] if double_quant else [state.absmax]
    return packed, state, tensors, state.state2.blocksize if double_quant else 0


def nf4_definition(packed, tensors, shape, nested_blocksize, dtype):
    """The format in plain torch: byte i holds values 2i (high nibble) and 2i+1 (low); 64 values share a scale."""
    count = shape[0] * shape[1]
    data = packed.view(torch.uint8).reshape(-1).long()
    codes = torch.stack([data >> 4, data & 15], dim=1).reshape(-1)[:count]
    table = bnb_functional.get_4bit_type("nf4", device=packed.device).float()
    if len(tensors) == 4:
        absmax_codes, nested_absmax, nested_code, offset = tensors
        group = torch.arange(absmax_codes.numel(), device=packed.device) // nested_blocksize
        scale = nested_code[absmax_codes.long()] * nested_absmax[group] + offset
    else:
        scale = tensors[0]
    values = table[codes] * scale.repeat_interleave(64)[:count]
    return values.to(dtype).reshape(shape)


@pytest.fixture(params=[True, False], ids=["per-block", "per-byte"])
def interpreter(monkeypatch, request):
    """Triton's interpreter, with either kernel: a block's scale computed once per block or once per byte."""
    monkeypatch.setattr(nf4_dequantize, "PER_BLOCK", request.param)
    monkeypatch.setattr(nf4_dequantize, "BLOCKS_PER_PROGRAM", 16)  # several programs and a partial last one
    with triton_interpreter(monkeypatch, nf4_dequantize._kernels):
        yield


@pytest.mark.parametrize("double_quant", [True, False])
def test_definition_is_bitsandbytes_format(double_quant):
    """The plain-torch statement equals bitsandbytes' own dequantization (float32, so no rounding differs)."""
    for shape in SHAPES:
        packed, state, tensors, nested_blocksize = quantize(shape, double_quant)
        state.dtype = torch.float32
        expected = bnb_functional.dequantize_4bit(packed, state)
        assert torch.equal(nf4_definition(packed, tensors, shape, nested_blocksize, torch.float32), expected), shape


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_equals_the_definition_in_the_interpreter(interpreter, double_quant, dtype, monkeypatch):
    monkeypatch.setattr(nf4_dequantize, "BYTES_PER_PROGRAM", 256)  # several programs and a partial last one
    for shape in SHAPES:
        packed, _, tensors, nested_blocksize = quantize(shape, double_quant)
        assert nf4_dequantize.can_dequantize(packed, *shape)
        ours = nf4_dequantize.dequantize_nf4(packed, tensors, *shape, 64, nested_blocksize, dtype)
        assert ours.shape == shape and ours.dtype == dtype
        assert torch.equal(ours, nf4_definition(packed, tensors, shape, nested_blocksize, dtype)), shape


@pytest.mark.parametrize("double_quant", [True, False])
def test_weights_of_whole_blocks_take_the_per_block_kernel(double_quant, monkeypatch):
    """Where a weight is whole blocks of 64 values the per-block kernel runs, not the per-byte one; 20 x 4100 (a
    partial last block) takes the per-byte kernel. Both give the format's values."""
    with triton_interpreter(monkeypatch, nf4_dequantize._kernels):
        monkeypatch.setattr(nf4_dequantize, "BLOCKS_PER_PROGRAM", 16)
        per_byte, per_block = nf4_dequantize._kernels()
        launched = []

        class Recording:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                launched.append(self.name)
                return self.kernel[grid]

        monkeypatch.setattr(nf4_dequantize, "_kernels", lambda: (Recording(per_byte, "byte"),
                                                                 Recording(per_block, "block")))
        for shape in SHAPES:
            packed, _, tensors, nested_blocksize = quantize(shape, double_quant)
            ours = nf4_dequantize.dequantize_nf4(packed, tensors, *shape, 64, nested_blocksize, torch.float32)
            assert torch.equal(ours, nf4_definition(packed, tensors, shape, nested_blocksize, torch.float32)), shape
    assert launched == ["block", "block", "block", "byte", "block"]  # SHAPES' order


def test_quantized_layers_dequantize_through_the_kernel(interpreter, monkeypatch):
    """`dequantize_weight`, which every QLoRA layer calls forward and backward, takes the kernel for NF4 when it
    can, and bitsandbytes' path when switched off: both give the format's values."""
    calls = []
    original = nf4_dequantize.dequantize_nf4
    monkeypatch.setattr(
        nf4_dequantize, "dequantize_nf4", lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs)
    )
    shape = (96, 256)
    packed, _, tensors, nested_blocksize = quantize(shape, True)
    expected = nf4_definition(packed, tensors, shape, nested_blocksize, torch.float32)
    ours = quantization.dequantize_weight(packed, tensors, "bnb.nf4", *shape, nested_blocksize, torch.float32)
    assert len(calls) == 1 and torch.equal(ours, expected)
    # Into rows of a larger buffer, as a joined q/k/v group dequantizes its weights for one GEMM.
    joined = torch.zeros(3 * shape[0], shape[1])
    rows = joined[shape[0] : 2 * shape[0]]
    written = quantization.dequantize_weight(
        packed, tensors, "bnb.nf4", *shape, nested_blocksize, torch.float32, out=rows
    )
    assert len(calls) == 2 and written.data_ptr() == rows.data_ptr() and torch.equal(rows, expected)
    assert not joined[: shape[0]].any() and not joined[2 * shape[0] :].any()
    monkeypatch.setattr(quantization, "use_nf4_kernel", False)
    theirs = quantization.dequantize_weight(packed, tensors, "bnb.nf4", *shape, nested_blocksize, torch.float32)
    assert len(calls) == 2 and torch.equal(theirs, expected)


def test_kernel_is_not_taken_without_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    packed, *_ = quantize((64, 256), True)
    assert not nf4_dequantize.can_dequantize(packed, 64, 256)


@pytest.mark.gpu
@pytest.mark.parametrize("per_block", [True, False])
@pytest.mark.parametrize("double_quant", [True, False])
def test_kernel_equals_bitsandbytes_on_the_gpu_bit_for_bit(double_quant, per_block, monkeypatch):
    monkeypatch.setattr(nf4_dequantize, "PER_BLOCK", per_block)
    assert nf4_dequantize.can_dequantize(torch.empty(2, device="cuda"), 64, 64)
    for shape in [*SHAPES, (300, 4096), (4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]:
        packed, state, tensors, nested_blocksize = quantize(shape, double_quant, device="cuda")
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            state.dtype = dtype
            expected = bnb_functional.dequantize_4bit(packed, state)
            ours = nf4_dequantize.dequantize_nf4(packed, tensors, *shape, 64, nested_blocksize, dtype)
            assert torch.equal(ours, expected), (shape, dtype)


@pytest.mark.gpu
@torch.inference_mode()
def test_nf4_model_generates_what_its_dequantized_weights_generate(stories_dir, monkeypatch):
    """Greedy decoding from an NF4 base, whose weights the kernel rebuilds at every step (eagerly, replayed in a CUDA
    graph, and in the compiled step), gives the ids of the same model with its weights dequantized once by
    bitsandbytes into plain layers (float32, so the weights are exact and the matmuls the same)."""
    from litft.adapters.quantization import QuantizedLinear, quantize_model
    from litft.checkpoint import load_model
    from litft.generation import generate

    quantized = load_model(
        stories_dir, dtype=torch.float32, device="cuda",
        prepare=lambda model: quantize_model(model, "bnb.nf4", compute_dtype=torch.float32),
    ).eval()
    plain = load_model(stories_dir, dtype=torch.float32, device="cuda").eval()
    layers = {name: module for name, module in quantized.named_modules() if isinstance(module, QuantizedLinear)}
    assert layers
    with monkeypatch.context() as patch:
        patch.setattr(quantization, "use_nf4_kernel", False)
        for name, layer in layers.items():
            plain.get_submodule(name).weight.copy_(layer.dequantized_weight())
    prompts = [[1, 400, 300, 20, 7], [1, 50]]
    reference = [result.token_ids for result in generate(plain, prompts, 24, [], use_cuda_graph=False)]
    for options in ({"use_cuda_graph": False}, {"use_cuda_graph": True}, {"use_cuda_graph": True, "compile": True}):
        assert [result.token_ids for result in generate(quantized, prompts, 24, [], **options)] == reference, options


@pytest.mark.parametrize("double_quant", [True, False])
def test_weights_laid_back_to_back_dequantize_in_one_launch_as_each_alone(interpreter, double_quant):
    """A mixture's experts: three weights quantized apart, their packed bytes, block scales, group scales and
    offsets laid back to back, dequantized in one launch: each weight's rows are what it dequantizes to alone. Each
    weight holds 256 x 64 blocks of 64 values: whole groups of 256 block scales."""
    shape = (256, 64 * 64)
    weights = [quantize(shape, double_quant, seed=seed) for seed in range(3)]
    alone = [
        nf4_dequantize.dequantize_nf4(packed, tensors, *shape, 64, nested, torch.float32)
        for packed, _, tensors, nested in weights
    ]
    joined_state = [torch.cat([tensors[0] for _, _, tensors, _ in weights])]
    if double_quant:
        joined_state += [
            torch.cat([tensors[1] for _, _, tensors, _ in weights]), weights[0][2][2],
            torch.stack([tensors[3].reshape(()) for _, _, tensors, _ in weights]),
        ]
    packed = torch.cat([packed for packed, _, _, _ in weights])
    together = nf4_dequantize.dequantize_nf4(
        packed, joined_state, *shape, 64, weights[0][3], torch.float32, weight_count=3
    )
    assert together.shape == (3 * shape[0], shape[1])
    assert torch.equal(together, torch.cat(alone))
