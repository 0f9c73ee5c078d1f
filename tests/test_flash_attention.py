"""FlashAttention-4 for causal attention (litft.models.flash_attention): where it applies, how it fails when asked
for and missing, and on a Hopper / Blackwell GPU with the package installed, the same attention, gradients and
compiled training step as SDPA's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_attention_as_close, causal_window_mask, fa4_ready
from torch.nn.attention import SDPBackend, sdpa_kernel

from litft.errors import ConfigError
from litft.models import common, flash_attention


def qkv(batch, seq, heads, kv_heads, head_dim, device="cpu", dtype=torch.float32, seed=0):
    """q, k, v (B, heads, T, hd) viewed from (B, T, heads, hd) memory, as a block's projections hand them over."""
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch, seq, count, head_dim, generator=generator).to(device, dtype).transpose(1, 2)
               for count in (heads, kv_heads, kv_heads)]
    return [t.requires_grad_() for t in tensors]


def test_applies_only_to_unmasked_causal_16_bit_cuda_attention(monkeypatch):
    """Where it cannot apply, `attention` never asks whether the GPU could run it: CPU tensors, float32, a mask,
    non-causal or decoding (one query over a longer cache) all stay with SDPA."""
    asked = []
    monkeypatch.setattr(flash_attention, "usable_on", lambda index: asked.append(index) or True)
    q, k, v = qkv(1, 8, 4, 2, 16)
    assert not flash_attention.applies(q, k, None, True)  # CPU
    cuda_like = torch.empty(1, 4, 8, 16, dtype=torch.bfloat16, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    mask = torch.ones(8, 8, dtype=torch.bool)
    assert not flash_attention.applies(cuda_like, cuda_like, mask, False)
    assert not flash_attention.applies(cuda_like, cuda_like, None, False)
    assert not flash_attention.applies(cuda_like.float(), cuda_like.float(), None, True)
    assert not flash_attention.applies(cuda_like[:, :, :1], cuda_like, None, True)  # decoding
    assert not flash_attention.applies(cuda_like[..., :12], cuda_like[..., :12], None, True)  # head size 12
    assert asked == []
    assert flash_attention.applies(cuda_like, cuda_like, None, True)
    assert asked == [0]


def test_cpu_attention_is_unchanged_whatever_the_setting(monkeypatch):
    q, k, v = qkv(2, 16, 4, 2, 8)
    reference = common.attention(q, k, v, None, True)
    for mode in flash_attention.FLASH_ATTENTION_4_MODES:
        monkeypatch.setattr(flash_attention, "FLASH_ATTENTION_4", mode)
        assert torch.equal(common.attention(q, k, v, None, True), reference)


def test_a_setting_outside_the_modes_is_refused(monkeypatch):
    monkeypatch.setattr(flash_attention, "FLASH_ATTENTION_4", "sometimes")
    for check in (lambda: flash_attention.usable_on(0), lambda: flash_attention.check_setting(torch.device("cpu"))):
        with pytest.raises(ConfigError, match="LITFT_FLASH_ATTENTION_4 is 'sometimes'; set it to one of auto, always"):
            check()
    monkeypatch.setattr(flash_attention, "FLASH_ATTENTION_4", "never")
    assert flash_attention.usable_on(0) is False  # never looks at the GPU or the package
    monkeypatch.setattr(flash_attention, "WINDOWS", "yes")
    with pytest.raises(ConfigError, match="LITFT_FLASH_ATTENTION_4_WINDOWS is 'yes'; set it to one of off, on"):
        flash_attention.check_setting(torch.device("cpu"))


def test_always_without_the_package_or_a_gpu_says_what_to_do(monkeypatch):
    monkeypatch.setattr(flash_attention, "FLASH_ATTENTION_4", "always")
    monkeypatch.setattr(flash_attention, "_kernels", None)
    monkeypatch.setattr(flash_attention, "_import_error", "ModuleNotFoundError: No module named 'flash_attn'")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    with pytest.raises(ConfigError, match=r"flash-attn-4 package does not import .*pip install 'litft\[flash\]'"):
        flash_attention.usable_on(0)
    with pytest.raises(ConfigError, match="needs a Hopper or Blackwell GPU and this run is on cpu"):
        flash_attention.check_setting(torch.device("cpu"))
    monkeypatch.setattr(flash_attention, "FLASH_ATTENTION_4", "auto")
    assert flash_attention.usable_on(0) is False
    assert flash_attention.check_setting(torch.device("cpu")) is False


def test_a_bad_setting_stops_finetune_with_one_line(tmp_path, stories_dir, monkeypatch, capsys):
    """Through the CLI: a non-zero exit, one line naming the variable, before the model loads (no out_dir yet)."""
    from litft.cli import main

    monkeypatch.setattr(flash_attention, "FLASH_ATTENTION_4", "fast")
    identity = Path(flash_attention.__file__).parents[1] / "assets" / "data" / "identity_500.sharegpt.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "lora", "--checkpoint", str(stories_dir), "--out_dir", str(tmp_path / "out"),
              "--accelerator", "cpu", "--data.path", str(identity), "--data.template", "plain"])
    assert exit_info.value.code != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "litft: error: LITFT_FLASH_ATTENTION_4 is 'fast'; set it to one of auto, always, never"
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_on_the_gpu_output_and_gradients_match_float32_attention(head_dim, kv_heads):
    """bf16 FlashAttention-4 against float32 attention: no larger errors than SDPA's own bf16 kernels (grouped
    heads read in place, their gradients summed over each group)."""
    if not fa4_ready():
        pytest.skip("needs a Hopper or Blackwell GPU and the flash-attn-4 package")
    seq, heads = 1024, 8
    grad = torch.randn(2, heads, seq, head_dim, generator=torch.Generator().manual_seed(5)).cuda()

    def run(attend, dtype):
        q, k, v = qkv(2, seq, heads, kv_heads, head_dim, "cuda", dtype)
        out = attend(q, k, v)
        out.backward(grad.to(dtype))
        return [t.float() for t in (out, q.grad, k.grad, v.grad)]

    group = heads // kv_heads
    with sdpa_kernel([SDPBackend.MATH]):
        reference = run(lambda q, k, v: F.scaled_dot_product_attention(
            q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True), torch.float32)
    flash = run(lambda q, k, v: flash_attention.causal_attention(q, k, v, None), torch.bfloat16)
    sdpa = run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
               torch.bfloat16)
    assert_attention_as_close(flash, sdpa, reference)


@pytest.mark.gpu
@pytest.mark.parametrize(("head_dim", "kv_heads", "window", "softcap"), [
    (128, 2, 300, None),  # Mistral-like: a window, grouped heads
    (256, 4, 512, 2.0),  # Gemma 2's sliding layers: heads of 256, window and cap (small, so that it bites)
    (256, 4, None, 2.0),  # Gemma 2's full layers
])
def test_on_the_gpu_windows_and_soft_capping_match_float32_attention(head_dim, kv_heads, window, softcap):
    """The window and the cap given to the kernels as numbers: against float32 attention under the dense window
    mask with explicit capped scores, errors no larger than that path's own in bf16 (the path it replaces)."""
    if not fa4_ready():
        pytest.skip("needs a Hopper or Blackwell GPU and the flash-attn-4 package")
    seq, heads = 1024, 8
    grad = torch.randn(2, heads, seq, head_dim, generator=torch.Generator().manual_seed(5)).cuda()
    mask = causal_window_mask(seq, window)

    def run(attend, dtype):
        q, k, v = qkv(2, seq, heads, kv_heads, head_dim, "cuda", dtype)
        out = attend(q, k, v)
        out.backward(grad.to(dtype))
        return [t.float() for t in (out, q.grad, k.grad, v.grad)]

    def masked(q, k, v):  # a mask keeps `attention` off FlashAttention-4
        return common.attention(q, k, v, mask, False, scale=0.1, softcap=softcap)

    with sdpa_kernel([SDPBackend.MATH]):
        reference = run(masked, torch.float32)
    flash = run(lambda q, k, v: flash_attention.causal_attention(q, k, v, 0.1, window, softcap), torch.bfloat16)
    baseline = run(masked, torch.bfloat16)
    assert_attention_as_close(flash, baseline, reference)


@pytest.mark.gpu
def test_on_the_gpu_the_operators_pass_torch_library_checks():
    """Fake tensors (shapes, strides, dtypes) agree with the kernels' outputs, and autograd's registration holds."""
    if not fa4_ready():
        pytest.skip("needs a Hopper or Blackwell GPU and the flash-attn-4 package")
    q, k, v = (t.transpose(1, 2) for t in qkv(2, 256, 8, 2, 64, "cuda", torch.bfloat16))  # (B, T, heads, hd)
    torch.library.opcheck(torch.ops.litft.flash_attention.default, (q, k, v, 0.125, flash_attention.NO_WINDOW,
                                                                    flash_attention.NO_SOFTCAP))
    torch.library.opcheck(torch.ops.litft.flash_attention.default, (q, k, v, 0.125, 100, 30.0))


@pytest.mark.gpu
def test_on_the_gpu_a_compiled_lora_step_matches_float32_as_sdpa_does(monkeypatch):
    """A compiled bf16 LoRA Llama (grouped heads) through FlashAttention-4: its loss and adapter gradients are
    within bf16's reach of the float32 model's (as the same compiled model's through SDPA are), and its compiled
    blocks really call the operator (it is not SDPA under another name)."""
    if not fa4_ready():
        pytest.skip("needs a Hopper or Blackwell GPU and the flash-attn-4 package")
    from conftest import assert_flash_attention_as_close, flash_attention_step_errors

    from litft.training.loss import CausalLMObjective

    config = {
        "model_type": "llama", "vocab_size": 256, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False, "head_dim": 64,
    }
    ids = torch.randint(0, 256, (2, 256), generator=torch.Generator().manual_seed(0)).cuda()

    def step(model):
        return CausalLMObjective(model)(ids, ids.roll(-1, dims=1))

    # The warm-up pass compiles the blocks before the counted one.
    report = flash_attention_step_errors(monkeypatch, config, step, "litft::flash_attention", warmup=(step,))
    assert (report["always"]["calls"], report["never"]["calls"]) == (2, 0), report  # once per block; SDPA
    assert_flash_attention_as_close(report)


def test_the_log_says_which_kernels_the_model_attends_through(monkeypatch):
    """The finetune log's attention line, per model and setting."""
    from types import SimpleNamespace

    from litft.commands.finetune import attention_description

    gemma2 = SimpleNamespace(attn_logit_softcapping=50.0, sliding_window=4096)
    llama = SimpleNamespace()
    cpu = torch.device("cpu")
    assert attention_description(gemma2, cpu) == "SDPA"
    monkeypatch.setattr(common, "FLEX_ATTENTION", "always")
    assert attention_description(llama, cpu) == "SDPA (flex_attention for packed rows)"
    assert attention_description(gemma2, cpu) == "SDPA (flex_attention for packed rows and soft-capped ones)"
    monkeypatch.setattr(flash_attention, "check_setting", lambda device: True)
    assert attention_description(llama, cpu) == "FlashAttention-4 (its variable-length kernels for packed rows)"
    assert "LITFT_FLASH_ATTENTION_4_WINDOWS=on gives them" in attention_description(gemma2, cpu)
    monkeypatch.setattr(flash_attention, "WINDOWS", "on")
    assert attention_description(gemma2, cpu) == "FlashAttention-4 (its variable-length kernels for packed rows)"
