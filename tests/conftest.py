"""Shared fixtures: paths to the real assets, tiny random Hugging Face checkpoints built by transformers
(test-only), and the GPU marker (tests marked `gpu` skip where CUDA is absent)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
import torch

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
STORIES = ROOT / "litft" / "assets" / "stories260K"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return STORIES


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny checkpoint (tests/model_zoo.py), built on first use and shared by every test file."""
    from model_zoo import FAMILY_BUILDERS

    class Lazy(dict):
        def __missing__(self, name: str) -> Path:
            self[name] = FAMILY_BUILDERS[name](tmp_path_factory.mktemp(name.replace(".", "_")))
            return self[name]

    return Lazy()


def save_tiny_hf_model(folder: Path, config_class_name: str, model_class_name: str, seed: int = 0,
                       tokenizer_from: Path | None = STORIES, **config_kwargs) -> Path:
    """Builds a random transformers model of the given classes, saves it with `save_pretrained` (float32,
    safetensors) and copies a real tokenizer beside it. Returns the folder."""
    import shutil

    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, config_class_name)(**config_kwargs)
    model = getattr(transformers, model_class_name)(config).eval()
    # Random init leaves some norms at exactly 1/0; perturb every parameter so a swapped weight would show.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tokenizer_from / name).exists():
                shutil.copy(tokenizer_from / name, folder / name)
    return folder


TINY_LLAMA = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama with the stories260K tokenizer (vocab 512), saved by transformers."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    return save_tiny_hf_model(folder, "LlamaConfig", "LlamaForCausalLM", **TINY_LLAMA)


@contextlib.contextmanager
def triton_interpreter(monkeypatch, *kernel_builders: Callable) -> Iterator[None]:
    """Triton's interpreter for litft's kernels on CPU: each module builds its kernel when first used (cached),
    interpreted or compiled by the environment then, so the caches are cleared on the way in and out."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for builder in kernel_builders:
        builder.cache_clear()
    yield
    for builder in kernel_builders:
        builder.cache_clear()



def compiled_recording_operators(module: torch.nn.Module) -> tuple[Callable, set[str]]:
    """torch.compile(module) through inductor, and the set that each compiled graph's called operators are added to
    as it compiles (to assert that litft's custom operators reach the compiled graph)."""
    from torch._inductor.compile_fx import compile_fx

    operators: set[str] = set()

    def backend(graph_module, example_inputs):
        operators.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return compile_fx(graph_module, example_inputs)

    torch._dynamo.reset()
    return torch.compile(module, backend=backend), operators


def random_lora_model(config: dict, dtype=torch.float32, quantize: str | None = None, **lora) -> torch.nn.Module:
    """A tiny random model of `config` (a Hugging Face config dict) with LoRA rank 4 on every linear layer (or as
    `lora` says), over a full-precision or quantized base, its B factors random so that the adapters contribute."""
    from litft.adapters.lora import LoRAConfig, apply_lora, lora_modules
    from litft.models import build_model

    torch.manual_seed(0)
    model = build_model(config)
    if quantize is not None:
        from litft.adapters.quantization import quantize_model

        quantize_model(model, quantize, torch.float32)
    model = model.to(dtype)
    apply_lora(model, LoRAConfig(**{"rank": 4, "alpha": 8, "targets": ["all-linear"], **lora}))
    with torch.no_grad():  # B starts at zero; give the adapters something to contribute
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, 0.5)
    return model


def fa4_ready() -> bool:
    """Whether FlashAttention-4's kernels run here: a Hopper or Blackwell GPU and the flash-attn-4 package."""
    from litft.models import flash_attention

    return (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in flash_attention.SUPPORTED_MAJORS
            and flash_attention.kernels() is not None)


def flash_attention_step_errors(
    monkeypatch, config: dict, step: Callable, operator: str, warmup: tuple[Callable, ...] = (), device: str = "cuda"
) -> dict[str, dict]:
    """A bf16 LoRA model of `config` (rank 16, alpha 32), its blocks compiled, with FlashAttention-4 "always" and
    "never": per mode, how far the loss `step(model)` returns and the adapters' gradients lie from the uncompiled
    float32 model's (relative errors), and how many times the profiler saw `operator` ("litft::...") in that pass.
    `warmup`: steps run first, compiling the blocks for what they feed them, not counted."""
    from litft.models import flash_attention
    from litft.training.compilation import compile_blocks

    def run(mode: str, dtype: torch.dtype, compiled: bool):
        monkeypatch.setattr(flash_attention, "FLASH_ATTENTION_4", mode)
        model = random_lora_model(config, dtype=dtype, rank=16, alpha=32).to(device).train()
        if compiled:
            torch._dynamo.reset()
            compile_blocks(model, "torch")
            for warmup_step in warmup:
                warmup_step(model).backward()
            model.zero_grad(set_to_none=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            loss = step(model)
            loss.backward()
        calls = sum(event.count for event in profiler.key_averages() if event.key == operator)
        grads = {name: p.grad.float() for name, p in model.named_parameters() if p.requires_grad}
        return loss.detach().float(), grads, calls

    reference_loss, reference_grads, _ = run("never", torch.float32, compiled=False)
    report = {}
    for mode in ("always", "never"):
        loss, grads, calls = run(mode, torch.bfloat16, compiled=True)
        report[mode] = {"calls": calls, "loss": ((loss - reference_loss).abs() / reference_loss.abs()).item(),
                        "grads": {name: ((grads[name] - expected).norm() / expected.norm()).item()
                                  for name, expected in reference_grads.items()}}
    return report


def causal_window_mask(seq_len: int, window: int | None, device: str = "cuda") -> torch.Tensor:
    """(T, T): query i may see key j when j <= i and, given a window, i - j < window (the rule of
    `common._slot_masks`), built here independently of it."""
    index = torch.arange(seq_len, device=device)
    return (index[None, :] <= index[:, None]) & (index[:, None] - index[None, :] < (window or seq_len))


def assert_attention_as_close(got: list[torch.Tensor], baseline: list[torch.Tensor],
                              expected: list[torch.Tensor]) -> None:
    """A bf16 attention's output and q, k, v gradients (`got`) against float32's (`expected`): each largest error
    no more than twice the `baseline` path's own in bf16, plus 0.1% of the largest expected value."""
    for name, value, baseline_value, reference in zip(("out", "grad_q", "grad_k", "grad_v"), got, baseline, expected):
        error, baseline_error = (value - reference).abs().max(), (baseline_value - reference).abs().max()
        assert error <= 2 * baseline_error + 1e-3 * reference.abs().max(), (name, error, baseline_error)


def assert_flash_attention_as_close(report: dict[str, dict]) -> None:
    """FlashAttention-4's errors against float32 (`flash_attention_step_errors`) within bf16's reach of the other
    path's. This tiny random model (its adapters' B drawn large) loses 6-17% of each gradient to bf16 through either
    kernel (measured on an H200: FlashAttention-4's errors within 4% of SDPA's); a wrong mask, scale or head grouping
    would be off by the whole gradient."""
    flash, other = report["always"], report["never"]
    assert flash["loss"] <= 2 * other["loss"] + 1e-4, report
    for name, error in flash["grads"].items():
        assert error <= 1.25 * other["grads"][name] + 5e-3, (name, error, other["grads"][name])


def square_loss_and_grads(model: torch.nn.Module, input_ids: torch.Tensor, step=None) -> tuple[torch.Tensor, dict]:
    """The mean square of the logits (of `step`, a compiled model, where given) and every trainable gradient."""
    model.zero_grad(set_to_none=True)
    loss = (model if step is None else step)(input_ids).float().square().mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def concurrently(*calls: Callable[[], T], workers: int = 2) -> list[T]:
    """The results of independent calls that each run `litft` processes, `workers` at a time (the first error
    raised). A process spends most of its ~10 s start importing, on one core, and the CI machine has two; each call
    is its own seeded, single-threaded process, so running beside another changes only its speed (a data cache they
    share is written atomically)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(call) for call in calls]
    return [future.result() for future in futures]
