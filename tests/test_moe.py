"""Mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE): what the family-wide tests in test_models, test_generate and
test_decode_static do not already prove for them (logits, padding, KV caches and generation against transformers).

Here: which layers LoRA and 4-bit quantization take (every expert's projections, never a router), that expert
adapters mean what transformers reads from a merged checkpoint, that the sorted dispatch's gradients are those of a
token-by-token mixture, and a LoRA fine-tune whose loss and update do not depend on how the batch is split."""

from __future__ import annotations

import pytest
import torch
from model_zoo import FAMILY_BUILDERS
from safetensors.torch import load_file
from test_finetune import finetune, one_step_flags, read_metrics
from test_lora import hf_model, input_ids, litft_lora_model, randomize_adapter
from test_merge import run_merge, write_adapter
from torch import nn

from litft.adapters.lora import LoRAConfig, LoRALinear, apply_lora, resolve_targets
from litft.adapters.quantization import QuantizedLinear, quantize_model
from litft.checkpoint import load_model, read_hf_config
from litft.models.llama import Router, SharedExpertGate, SparseMoE
from litft.training.estimate import parameter_count

MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]
EXPERTS = 4


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    return {name: FAMILY_BUILDERS[name](tmp_path_factory.mktemp(name)) for name in MOE_FAMILIES}


def sparse_blocks(model: nn.Module) -> list[SparseMoE]:
    return [module for module in model.modules() if isinstance(module, SparseMoE)]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_all_linear_adapts_every_expert_and_never_a_router(family, moe_checkpoints):
    model = load_model(moe_checkpoints[family], dtype=torch.float32)
    targets = resolve_targets(model, ["all-linear"])
    expert_names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    expected_experts = {
        f"model.layers.0.{moe}.experts.{e}.{name}" for e in range(EXPERTS) for name in expert_names
    }
    assert expected_experts <= set(targets)
    assert not [name for name in targets if name.endswith(("gate", "shared_expert_gate", "lm_head"))]
    assert isinstance(model.get_submodule(f"model.layers.0.{moe}.gate"), Router)
    # The short names reach the experts too: `gate` is every expert's gate projection, not the router.
    gates = resolve_targets(model, ["gate"])
    assert f"model.layers.0.{moe}.experts.3.{expert_names[0]}" in gates
    assert f"model.layers.0.{moe}.gate" not in gates
    if family == "qwen2_moe":  # its shared expert is a target like any other; its sigmoid gate is not
        assert "model.layers.0.mlp.shared_expert.up_proj" in targets
        assert "model.layers.1.mlp.up_proj" in targets  # the dense layer (mlp_only_layers)
        assert not isinstance(model.model.layers[1].mlp, SparseMoE)
        assert isinstance(model.model.layers[0].mlp.shared_expert_gate, SharedExpertGate)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_merged_expert_adapters_load_in_transformers_with_the_adapted_logits(family, moe_checkpoints, tmp_path):
    """A random adapter on every expert, merged: transformers (which holds the experts stacked) computes from the
    merged checkpoint exactly what litft's adapted model computes, so each expert's adapter went to that expert."""
    checkpoint = moe_checkpoints[family]
    config = LoRAConfig(rank=4, alpha=8, targets=["all-linear"])
    adapted_logits = write_adapter(checkpoint, tmp_path / "adapter", config)
    base_logits = load_model(checkpoint, dtype=torch.float32)(input_ids()).detach()
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)  # the adapter changes what the experts do
    run_merge("--checkpoint", checkpoint, "--adapter", tmp_path / "adapter", "--out_dir", tmp_path / "merged")
    with torch.no_grad():
        logits = hf_model(tmp_path / "merged")(input_ids=input_ids()).logits
    torch.testing.assert_close(logits, adapted_logits, atol=1e-5, rtol=1e-5)


def token_by_token(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The mixture as its definition reads: each token, each of its chosen experts, weighted and summed."""
    B, T, C = x.shape
    rows = x.reshape(B * T, C)
    weights, chosen = moe.gate(rows)
    outputs = []
    for token in range(rows.shape[0]):
        y = sum(weights[token, slot] * moe.experts[int(chosen[token, slot])](rows[token : token + 1])[0]
                for slot in range(chosen.shape[1]))
        if hasattr(moe, "shared_expert"):
            y = y + moe.shared_expert_gate(rows[token : token + 1])[0] * moe.shared_expert(rows[token : token + 1])[0]
        outputs.append(y)
    return torch.stack(outputs).reshape(B, T, C)


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("tokens", [1, 14])
def test_dispatch_gradients_equal_the_token_by_token_mixture(family, tokens, moe_checkpoints):
    model = litft_lora_model(moe_checkpoints[family], LoRAConfig(rank=4, alpha=8, targets=["all-linear"]))
    randomize_adapter(model)
    moe = sparse_blocks(model)[0]
    x = torch.randn(1, tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    probe = torch.randn(1, tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    chosen = set(moe.gate(x.reshape(tokens, -1))[1].flatten().tolist())
    assert len(chosen) == (2 if tokens == 1 else EXPERTS)  # one token leaves two experts without work
    parameters = [p for p in moe.parameters() if p.requires_grad]

    x.requires_grad_(True)
    ours = moe(x)
    gradients = torch.autograd.grad((ours * probe).sum(), [x, *parameters])
    reference = token_by_token(moe, x)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    reference_gradients = torch.autograd.grad((reference * probe).sum(), [x, *parameters], allow_unused=True)
    # The input's gradient: each token's rows' gradients summed back over its chosen experts.
    torch.testing.assert_close(gradients[0], reference_gradients[0], atol=1e-5, rtol=1e-5)
    gradients, reference_gradients = gradients[1:], reference_gradients[1:]
    names = [name for name, p in moe.named_parameters() if p.requires_grad]
    for name, gradient, expected in zip(names, gradients, reference_gradients):
        # Every adapter gets a gradient, an unused expert's a zero one (so DDP never waits for a missing one).
        assert gradient is not None, name
        if name.startswith("experts.") and int(name.split(".")[1]) not in chosen:
            assert expected is None and not gradient.any(), name
        else:
            torch.testing.assert_close(gradient, expected, atol=1e-5, rtol=1e-5, msg=name)


def test_quantization_takes_the_experts_and_leaves_routers_in_full_precision(moe_checkpoints):
    def prepare(model: nn.Module) -> None:
        quantize_model(model, "bnb.nf4", compute_dtype=torch.float32)
        apply_lora(model, LoRAConfig(rank=4, targets=["all-linear"]))

    model = load_model(moe_checkpoints["qwen2_moe"], dtype=torch.float32, prepare=prepare)
    moe = model.model.layers[0].mlp
    assert isinstance(moe.experts[2].down_proj, LoRALinear) and moe.experts[2].down_proj.quantization is not None
    assert moe.shared_expert.up_proj.quantization is not None
    assert isinstance(model.model.layers[1].mlp.down_proj, LoRALinear)  # the dense layer's MLP
    assert moe.gate.weight.dtype == torch.float32 and moe.shared_expert_gate.weight.dtype == torch.float32
    assert not [name for name, module in model.named_modules() if type(module) is QuantizedLinear]  # all adapted
    assert torch.isfinite(model(input_ids())).all()


def test_parameter_count_is_what_a_token_computes_with(moe_checkpoints):
    """The estimate's work per token counts a token's chosen experts, not all of them."""
    hf_config = read_hf_config(moe_checkpoints["mixtral"])
    model = load_model(moe_checkpoints["mixtral"], dtype=torch.float32)
    total = sum(p.numel() for name, p in model.named_parameters() if ".gate." not in name and "norm" not in name)
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    active = total - experts + experts * hf_config["num_experts_per_tok"] // hf_config["num_local_experts"]
    assert parameter_count(hf_config) == active


def test_lora_fine_tune_of_a_mixture_does_not_depend_on_the_batch_split(moe_checkpoints, tmp_path):
    results = {}
    for micro_batch_size in (2, 8):
        out_dir = tmp_path / f"micro{micro_batch_size}"
        finetune("lora", moe_checkpoints["qwen3_moe"], out_dir, *one_step_flags(micro_batch_size, pack=False))
        adapter = load_file(out_dir / "final" / "adapter_model.safetensors")
        results[micro_batch_size] = (read_metrics(out_dir)[1]["train/loss"], adapter)
    loss, adapter = results[8]
    assert any(".experts.3.down_proj.lora_B" in name for name in adapter)
    assert not any(".mlp.gate." in name for name in adapter)
    other_loss, other_adapter = results[2]
    assert other_loss == pytest.approx(loss, rel=1e-6)
    for name, tensor in adapter.items():
        if tensor.any():
            assert ((other_adapter[name] - tensor).norm() / tensor.norm()) < 5e-6, name
        else:
            assert not other_adapter[name].any(), name


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_expert_adapters_load_in_peft_with_the_adapted_logits(family, moe_checkpoints, tmp_path):
    """The adapter folder itself, read by PEFT onto transformers' model (whose experts are stacked tensors): the
    same logits. (transformers 5.24 with PEFT 0.21 drops Qwen2-MoE's routed-expert adapters on load, so there the
    README points to `litft merge`.)"""
    import peft

    checkpoint = moe_checkpoints[family]
    config = LoRAConfig(rank=4, alpha=8, targets=["all-linear"])
    adapted_logits = write_adapter(checkpoint, tmp_path / "adapter", config)
    model = peft.PeftModel.from_pretrained(hf_model(checkpoint), tmp_path / "adapter").eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids()).logits
    torch.testing.assert_close(logits, adapted_logits, atol=1e-5, rtol=1e-5)


def test_a_mixture_resumes_from_a_checkpoint_with_its_stacked_adapters(moe_checkpoints, tmp_path):
    """A resumable checkpoint holds the stacked expert adapters and their optimizer state under the stacked names:
    continued from step 2 of a 4-step run, another run ends with the same adapter and the same last loss."""
    from safetensors.torch import load_file as load_tensors

    checkpoint = moe_checkpoints["qwen3_moe"]
    flags = ("--lora.targets", "all-linear", "--train.max_steps", "4", "--train.save_interval", "2",
             "--train.global_batch_size", "2", "--data.limit", "16", "--train.warmup_steps", "0")
    finetune("lora", checkpoint, tmp_path / "straight", *flags)
    step_two = tmp_path / "straight" / "checkpoints" / "step-00000002"
    assert step_two.exists()
    finetune("lora", checkpoint, tmp_path / "resumed", *flags, "--resume", str(step_two))
    resumed_steps = {step for step, row in read_metrics(tmp_path / "resumed").items() if "train/loss" in row}
    assert resumed_steps == {3, 4}  # it trained only after the checkpoint: equal below only if state came back
    assert read_metrics(tmp_path / "resumed")[4]["train/loss"] == read_metrics(tmp_path / "straight")[4]["train/loss"]
    expected = load_tensors(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    resumed = load_tensors(tmp_path / "resumed" / "final" / "adapter_model.safetensors")
    assert resumed.keys() == expected.keys() and any(".experts.3." in name for name in expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("join_weights", [True, False])
def test_training_loads_a_mixture_with_its_expert_adapters_stacked(join_weights, moe_checkpoints):
    """Loaded for training, a mixture's expert adapters are two parameters per projection, also where the frozen
    weights are left apart for FSDP2 (join_weights False): FSDP2 then shards 6 adapter tensors per layer, not 768."""
    from pathlib import Path

    from litft.commands.finetune import load_for_training

    config = LoRAConfig(rank=4, alpha=8, targets=["all-linear"])
    model = load_for_training("lora", Path(moe_checkpoints["qwen3_moe"]), torch.float32, torch.device("cpu"), config,
                              None, join_weights)
    for moe in sparse_blocks(model):
        stacked = [name for name, _ in moe.experts.named_parameters(recurse=False)]
        assert sorted(stacked) == sorted(f"{p}_{f}" for p in ("gate_proj", "up_proj", "down_proj")
                                         for f in ("lora_A", "lora_B"))
        assert all(p.requires_grad for p in moe.experts.parameters(recurse=False))
    laid = [lora_experts_joint(moe) for moe in sparse_blocks(model)]
    assert all(laid) if join_weights else not any(laid)


def lora_experts_joint(moe: SparseMoE) -> bool:
    from litft.adapters import lora_experts

    gate_up_order, _ = lora_experts._kinds(lora_experts._projections(moe.experts))
    return lora_experts._joint(gate_up_order, "weight") is not None


@pytest.mark.parametrize("grouped", [False, True])
def test_two_processes_compute_a_mixtures_update_like_one(grouped, moe_checkpoints, tmp_path, monkeypatch):
    """DDP and FSDP2 on two processes against one: the same loss and the same update of every adapter, experts
    included, although each rank routes only its own rows (so the experts that run differ between the ranks and
    the single run). One SGD step, whose update is the gradient itself: over several Adam steps, summation order
    alone moves a mixture's adapters by ~5e-5 (one process with micro-batches of 2 against 8 does too), since
    Adam's normalised update turns rounding in near-zero gradients into steps of the learning rate's size.
    `grouped`: the experts through the grouped GEMMs (CPU float32 here), laid back to back in the single and DDP
    runs, copied together at each call under FSDP2."""
    from functools import partial

    from conftest import concurrently
    from test_distributed import adapter as final_adapter
    from test_distributed import finetune as finetune_process
    from test_distributed import losses

    if grouped:
        import subprocess
        import sys

        monkeypatch.setenv("LITFT_GROUPED_EXPERTS_ON_CPU", "1")
        switch = "from litft.adapters import lora_experts; print(lora_experts.ON_CPU)"
        started = subprocess.run([sys.executable, "-c", switch], capture_output=True, text=True, check=True)
        assert started.stdout.strip() == "True"  # what the runs below start with
    checkpoint, cache = moe_checkpoints["qwen3_moe"], tmp_path / "cache"
    flags = ("--lora.targets", "all-linear", "--train.max_steps", "1", "--train.optimizer", "sgd", "--train.lr", "1.0",
             "--train.warmup_steps", "0", "--train.lr_scheduler", "constant")
    concurrently(
        partial(finetune_process, checkpoint, tmp_path / "single", cache, *flags),
        partial(finetune_process, checkpoint, tmp_path / "ddp", cache, *flags, "--devices", "2", "--strategy", "ddp"),
        partial(finetune_process, checkpoint, tmp_path / "fsdp", cache, *flags, "--devices", "2", "--strategy", "fsdp"),
    )
    reference, reference_adapter = losses(tmp_path / "single")[1], final_adapter(tmp_path / "single")
    assert reference_adapter["base_model.model.model.layers.1.mlp.experts.3.up_proj.lora_B.weight"].any()
    for strategy in ("ddp", "fsdp"):
        assert losses(tmp_path / strategy)[1] == pytest.approx(reference, rel=1e-6), strategy
        adapter = final_adapter(tmp_path / strategy)
        assert adapter.keys() == reference_adapter.keys()
        for name, tensor in reference_adapter.items():
            if tensor.any():
                assert ((adapter[name] - tensor).norm() / tensor.norm()) < 5e-6, (strategy, name)
            else:  # the B factor of an expert no row reached
                assert not adapter[name].any(), (strategy, name)


def two_decoding_steps(model: nn.Module, device: str = "cuda"):
    """A DecodeStep (CUDA graphs asked for) after a two-token prefill, having run two steps: by then it has either
    recorded its graph or found that the model reads on the host."""
    from litft.generation import DecodeStep

    dtype = next(model.parameters()).dtype
    cache = model.make_kv_cache(1, 8, device, dtype)
    model.hidden_states(torch.tensor([[5, 17]], device=device), torch.tensor([[0, 1]], device=device),
                        torch.ones(1, 2, dtype=torch.long, device=device), cache)
    step = DecodeStep(model, cache, torch.full((1, 1), 2, device=device), use_cuda_graph=True)
    step(torch.tensor([4], device=device))
    step(torch.tensor([7], device=device))
    return step


@pytest.mark.gpu
def test_a_mixture_trains_compiled_and_generates_on_the_gpu(moe_checkpoints, tmp_path):
    """On the GPU path: LoRA steps in bf16 with `--compile` (which leaves the mixture's blocks eager) against
    eager; then generation: with the experts one by one (not laid out) the default CUDA-graph decoding steps aside
    for their host-side counts, and laid out as `litft generate` lays them, the step is recorded in a CUDA graph;
    both give the eager tokens."""
    from test_finetune import IDENTITY

    from litft.cli import main
    from litft.generation import generate

    checkpoint = moe_checkpoints["mixtral"]
    first_losses = {}
    for compiled in (False, True):
        out_dir = tmp_path / f"compiled-{compiled}"
        main(["finetune", "lora", "--checkpoint", str(checkpoint), "--out_dir", str(out_dir), "--accelerator", "cuda",
              "--precision", "bf16-true", "--data.path", str(IDENTITY), "--data.template", "plain", "--seed", "7",
              "--data.limit", "16", "--data.max_seq_length", "256", "--train.global_batch_size", "8",
              "--train.micro_batch_size", "4", "--train.max_steps", "2", "--lora.targets", "all-linear",
              "--compile", str(compiled).lower()])
        first_losses[compiled] = read_metrics(out_dir)[1]["train/loss"]
        adapter = load_file(out_dir / "final" / "adapter_model.safetensors")
        assert any(".experts.3.w2.lora_B" in name for name in adapter)
    assert first_losses[True] == pytest.approx(first_losses[False], rel=2e-2)

    from litft.adapters.lora_experts import lay_experts_back_to_back

    model = load_model(checkpoint, dtype=torch.bfloat16, device="cuda").eval().requires_grad_(False)
    prompts = [[5, 17, 99, 4], [8, 9]]
    for laid_out in (False, True):
        if laid_out:
            assert lay_experts_back_to_back(model) == len(sparse_blocks(model))
        with torch.inference_mode():
            step = two_decoding_steps(model)
            assert (step.graph is not None) == laid_out and step.use_cuda_graph == laid_out
            eager = [r.token_ids for r in generate(model, prompts, 12, [2], use_cuda_graph=False)]
            default = [r.token_ids for r in generate(model, prompts, 12, [2])]
        assert default == eager and all(eager)


def test_tiled_mlp_runs_a_mixture_tile_by_tile_with_the_same_logits(moe_checkpoints):
    from litft.training.tiling import enable_tiled_mlp

    model = load_model(moe_checkpoints["mixtral"], dtype=torch.float32)
    with torch.no_grad():
        whole = model(input_ids())
        enable_tiled_mlp(model, 5)  # 24 tokens in tiles of 5: each tile routes its own tokens
        torch.testing.assert_close(model(input_ids()), whole, atol=1e-5, rtol=1e-5)


def test_thunder_refuses_a_mixture_in_one_line(moe_checkpoints):
    from litft.errors import ConfigError
    from litft.training.compilation import refuse_what_thunder_cannot_compile

    with pytest.raises(ConfigError, match="--compiler thunder does not support mixtures of experts"):
        refuse_what_thunder_cannot_compile(load_model(moe_checkpoints["qwen3_moe"], dtype=torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", [None, "bnb.nf4"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_grouped_experts_compute_what_the_experts_compute_one_by_one(family, quantize, moe_checkpoints):
    """On the GPU a mixture's LoRA experts run as grouped GEMMs over their frozen weights laid back to back, or
    4-bit weights dequantized together (litft.adapters.lora_experts): the same output, input gradient and adapter
    gradients as each expert on its own rows, to bf16's rounding; an expert that no row reached gets a zero
    gradient there too."""
    from litft.adapters import lora_experts
    from litft.adapters.lora_projections import join_frozen_weights

    def prepare(model: nn.Module) -> None:
        if quantize:
            quantize_model(model, quantize, compute_dtype=torch.bfloat16)

    model = load_model(moe_checkpoints[family], dtype=torch.bfloat16, device="cuda", prepare=prepare)
    apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=["all-linear"]))
    randomize_adapter(model)
    join_frozen_weights(model)
    moe = sparse_blocks(model)[0]
    x = torch.randn(3, 40, model.config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    probe = torch.randn_like(x)
    rows = x.detach().reshape(-1, x.shape[-1])[:64]
    ones = torch.ones(64, device="cuda", dtype=torch.bfloat16)
    ends = torch.full((EXPERTS,), 64, device="cuda", dtype=torch.int32)  # every row expert 0's
    assert lora_experts.experts_together(moe.experts, rows, ends, ones) is not None  # applies
    assert_grouped_equals_one_by_one(moe, x, probe)


def test_compiled_elementwise_of_grouped_experts_computes_what_they_compute_one_by_one(moe_checkpoints, monkeypatch):
    """Under --compile (`compile_blocks` marks the mixture) the grouped path's weighted SwiGLU runs compiled, and
    the experts' two summands are added as each token's rows are gathered and summed, in one compiled kernel: the
    same output and gradients as each expert on its own (CPU, torch's grouped GEMM, bf16)."""
    from litft.adapters import lora_experts
    from litft.training.compilation import compile_blocks

    monkeypatch.setattr(lora_experts, "ON_CPU", True)
    model = load_model(moe_checkpoints["qwen3_moe"], dtype=torch.bfloat16)
    apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=["all-linear"]))
    randomize_adapter(model)
    from litft.adapters.lora_projections import join_frozen_weights

    join_frozen_weights(model)
    compile_blocks(model, "torch")
    moe = sparse_blocks(model)[0]
    assert moe.experts.__dict__[lora_experts.COMPILE_ELEMENTWISE]
    torch.manual_seed(0)
    x = torch.randn(2, 24, model.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    rows, ends = x.detach().reshape(-1, x.shape[-1]), torch.full((EXPERTS,), 48, dtype=torch.int32)
    summands = lora_experts.experts_together(moe.experts, rows, ends, torch.ones(48, dtype=torch.bfloat16))
    assert isinstance(summands, tuple)  # the compiled path: base and adapter apart, for the compiled sum
    assert_grouped_equals_one_by_one(moe, x, torch.randn_like(x))


@pytest.mark.parametrize("family, rank", [("mixtral", 8), ("qwen2_moe", 8), ("qwen3_moe", 8), ("qwen3_moe", 4)])
def test_grouped_experts_on_cpu_compute_what_the_experts_compute_one_by_one(family, rank, moe_checkpoints,
                                                                            monkeypatch):
    """The same comparison on CPU, where torch's grouped GEMM also runs (slowly; off by default): the routing, the
    run ends found on the device, the rows' gathers and their gradients, the grouped GEMMs and the plan kept
    between calls, without a GPU. Rank 4: the adapters are padded to the 16-byte rows the grouped GEMM needs (as
    on the GPU, CPU refuses rank-4 operands)."""
    from litft.adapters import lora_experts
    from litft.adapters.lora_projections import join_frozen_weights

    monkeypatch.setattr(lora_experts, "ON_CPU", True)
    model = load_model(moe_checkpoints[family], dtype=torch.bfloat16)
    apply_lora(model, LoRAConfig(rank=rank, alpha=2 * rank, targets=["all-linear"]))
    randomize_adapter(model)
    join_frozen_weights(model)
    moe = sparse_blocks(model)[0]
    torch.manual_seed(0)
    x = torch.randn(3, 40, model.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    rows = x.detach().reshape(-1, x.shape[-1])[:64]
    ends = torch.full((EXPERTS,), 64, dtype=torch.int32)
    assert lora_experts.experts_together(moe.experts, rows, ends, torch.ones(64, dtype=torch.bfloat16)) is not None
    assert_grouped_equals_one_by_one(moe, x, torch.randn_like(x))
    # The plan is kept, and found again once the adapters are switched off (then the experts run one by one).
    plan = moe.experts.__dict__["_grouped_plan"]
    moe(x)
    assert moe.experts.__dict__["_grouped_plan"] is plan
    from litft.adapters.lora import adapters_disabled

    with adapters_disabled(model):
        assert lora_experts.experts_together(moe.experts, rows, ends, torch.ones(64, dtype=torch.bfloat16)) is None
    assert lora_experts.experts_together(moe.experts, rows, ends, torch.ones(64, dtype=torch.bfloat16)) is not None
    # Weights given new memory under the same parameters (as model.to(...) does) are found again: no longer back
    # to back, the grouped GEMMs read them copied together at each call, on the new values.
    with torch.no_grad():
        for parameter in moe.experts.parameters():
            parameter.data = parameter.data.clone() * 1.5
    assert lora_experts.experts_together(moe.experts, rows, ends, torch.ones(64, dtype=torch.bfloat16)) is not None
    assert not moe.experts.__dict__["_grouped_plan"].plan.holds_views
    assert_grouped_equals_one_by_one(moe, x, torch.randn_like(x))


@pytest.mark.parametrize("quantize", [None, "bnb.nf4"])
def test_grouped_experts_run_under_fsdp2_on_weights_it_gathers(quantize, moe_checkpoints, monkeypatch):
    """FSDP2 gives every gathered weight memory of its own, so the experts cannot lie back to back: the grouped
    GEMMs read them copied together, forward and backward (where FSDP2 has gathered them again). One process on
    CPU, float32: every mixture takes the grouped path in every step, its plan is kept between steps although the
    weights' memory moves, and the loss and every gradient are the unsharded model's with its experts one by one."""
    import tempfile

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from litft.adapters import lora_experts
    from litft.training.parallel import parallelize_fsdp2

    monkeypatch.setattr(lora_experts, "ON_CPU", True)
    grouped_calls = []
    experts_together = lora_experts.experts_together

    def recording(*args, **kwargs):
        result = experts_together(*args, **kwargs)
        grouped_calls.append(result is not None)
        return result

    monkeypatch.setattr(lora_experts, "experts_together", recording)

    def prepare(model: nn.Module) -> None:
        if quantize:
            quantize_model(model, quantize, compute_dtype=torch.float32)

    def adapted() -> nn.Module:
        model = load_model(moe_checkpoints["qwen3_moe"], dtype=torch.float32, prepare=prepare)
        apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=["all-linear"]))
        torch.manual_seed(0)
        randomize_adapter(model)
        lora_experts.stack_mixture_adapters(model)
        return model

    reference, model = adapted(), adapted()
    ids = input_ids(batch=4)  # enough rows for 4-bit experts to be dequantized all at once
    monkeypatch.setattr(lora_experts, "ENABLED", False)
    expected_loss = reference(ids).logsumexp(-1).mean()
    expected_loss.backward()
    monkeypatch.setattr(lora_experts, "ENABLED", True)
    grouped_calls.clear()
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", store=dist.FileStore(f"{folder}/store", 1), rank=0, world_size=1)
        try:
            parallelize_fsdp2(model, init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",)))
            mixtures = sparse_blocks(model)
            plans = []
            for _ in range(2):
                model.zero_grad()
                loss = model(ids).logsumexp(-1).mean()
                loss.backward()
                plans.append([moe.experts.__dict__["_grouped_plan"] for moe in mixtures])
            gradients = {name: parameter.grad.full_tensor() for name, parameter in model.named_parameters()
                         if parameter.grad is not None}
        finally:
            dist.destroy_process_group()
    assert grouped_calls == [True] * 2 * len(mixtures)
    assert all(cached.plan is not None and not cached.plan.holds_views for cached in plans[0])
    assert all(first is second for first, second in zip(*plans))  # found once
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    expected = {name: parameter.grad for name, parameter in reference.named_parameters() if parameter.grad is not None}
    assert gradients.keys() == expected.keys() and any(".experts." in name for name in expected)
    for name, gradient in expected.items():
        assert (gradients[name] - gradient).norm() <= 1e-5 * gradient.norm(), name


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", [None, "bnb.nf4"])
def test_grouped_experts_never_wait_for_the_gpu(quantize, moe_checkpoints):
    """The routing keeps each expert's run of rows on the device: a mixture's forward and backward through the
    grouped GEMMs make no synchronizing call (the one-by-one path reads the counts on the host, once per layer)."""
    from litft.adapters.lora_projections import join_frozen_weights

    def prepare(model: nn.Module) -> None:
        if quantize:
            quantize_model(model, quantize, compute_dtype=torch.bfloat16)

    model = load_model(moe_checkpoints["qwen3_moe"], dtype=torch.bfloat16, device="cuda", prepare=prepare)
    apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=["all-linear"]))
    join_frozen_weights(model)
    moe = sparse_blocks(model)[0]
    x = torch.randn(4, 64, model.config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    (moe(x).float().sum()).backward()  # the plan is found (host work) on the first call
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (moe(x).float().sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def assert_grouped_equals_one_by_one(moe: SparseMoE, x: torch.Tensor, probe: torch.Tensor) -> None:
    """The mixture's output and the gradients of (output * probe).sum() for x and every adapter, grouped GEMMs
    against each expert on its own, to bf16's rounding; zero gradients stay exactly zero."""
    from litft.adapters import lora_experts

    parameters = [p for p in moe.parameters() if p.requires_grad]
    results = {}
    for enabled in (True, False):
        lora_experts.ENABLED = enabled
        try:
            output = moe(x)
            results[enabled] = (output, torch.autograd.grad((output.float() * probe).sum(), [x, *parameters]))
        finally:
            lora_experts.ENABLED = True
    (grouped, grouped_gradients), (alone, alone_gradients) = results[True], results[False]
    torch.testing.assert_close(grouped, alone, atol=2e-2, rtol=2e-2)
    for gradient, expected in zip(grouped_gradients, alone_gradients):
        if not expected.any():
            assert not gradient.any()
        else:
            assert ((gradient.float() - expected.float()).norm() / expected.float().norm()) < 2e-2


def test_experts_laid_back_to_back_keep_their_names_values_and_logits(moe_checkpoints, tmp_path):
    """What the grouped GEMMs read: after join_frozen_weights every expert's frozen gate and up weights are views
    of one (experts, 2I, C) storage and its down weight of one (experts, C, I), under the same names, with the same
    values; each projection's expert adapters are two stacked parameters (A, B) instead of two per expert, while
    the adapter keeps its per-expert names and values (what PEFT reads), and gradients reach every expert's slice.
    On CPU (no grouped GEMM by default) the experts then run one by one on those views."""
    from litft.adapters import lora_experts
    from litft.adapters.lora import adapter_state_dict
    from litft.adapters.lora_projections import join_frozen_weights
    from litft.adapters.peft_format import load_peft_adapter, save_peft_adapter

    config = LoRAConfig(rank=8, alpha=16, targets=["all-linear"])
    model = litft_lora_model(moe_checkpoints["qwen3_moe"], config)
    randomize_adapter(model)
    adapter_names = set(adapter_state_dict(model))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    adapter_before = {name: tensor.clone() for name, tensor in adapter_state_dict(model).items()}
    trainable_before = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        logits = model(input_ids())
    join_frozen_weights(model)
    after = model.state_dict()
    frozen = [name for name in before if name not in adapter_names]
    assert all(torch.equal(after[name], before[name]) for name in frozen)
    adapter_after = adapter_state_dict(model)
    assert adapter_after.keys() == adapter_before.keys()
    assert all(torch.equal(adapter_after[name], adapter_before[name]) for name in adapter_before)
    trainable = [p for p in model.parameters() if p.requires_grad]
    mixtures = len(sparse_blocks(model))
    assert len(trainable) == len(trainable_before) - mixtures * (EXPERTS * 6 - 6)
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in trainable_before)
    first = sparse_blocks(model)[0]
    assert first.experts.gate_proj_lora_A.shape == (EXPERTS, 8, 64)
    assert first.experts.down_proj_lora_B.shape == (EXPERTS, 64, 8)
    # Every expert's slice takes its gradient, the stacked parameter holds them side by side.
    model(input_ids()).float().pow(2).mean().backward()
    used = first.experts.down_proj_lora_A.grad.flatten(1).abs().sum(dim=1)
    assert (used > 0).sum() >= 2
    # Saved as PEFT reads it, per expert, and loaded back into a model that stacks again.
    save_peft_adapter(model, config, tmp_path / "adapter", "base")
    reloaded = load_model(moe_checkpoints["qwen3_moe"], dtype=torch.float32)
    load_peft_adapter(reloaded, tmp_path / "adapter")
    join_frozen_weights(reloaded)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids()), logits, atol=1e-5, rtol=1e-5)
    # Merged in place, the stacked adapters go with the LoRA layers: the state is the base model's names alone.
    from litft.adapters.lora import merge_lora_

    merge_lora_(reloaded)
    assert set(reloaded.state_dict()) == set(load_model(moe_checkpoints["qwen3_moe"], dtype=torch.float32).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids()), logits, atol=1e-5, rtol=1e-5)
    for moe in sparse_blocks(model):
        layers = lora_experts._projections(moe.experts)
        gate_up_order, down_order = lora_experts._kinds(layers)
        gate_up = lora_experts._joint(gate_up_order, "weight").view(EXPERTS, 2 * 32, 64)
        downs = lora_experts._joint(down_order, "weight").view(EXPERTS, 64, 32)
        for index, (gate, up, down) in enumerate(layers):
            assert torch.equal(gate_up[index], torch.cat([gate.weight, up.weight]))
            assert torch.equal(downs[index], down.weight)
        ends = torch.full((EXPERTS,), 3, dtype=torch.int32)
        assert lora_experts.experts_together(moe.experts, torch.randn(3, 64), ends, torch.ones(3)) is None
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()), logits, atol=0, rtol=0)


def test_compile_leaves_a_mixture_eager_and_compiles_its_attention_and_the_dense_blocks(moe_checkpoints):
    from litft.training.compilation import compile_blocks

    model = litft_lora_model(moe_checkpoints["qwen2_moe"], LoRAConfig(rank=8, alpha=16, targets=["all-linear"]))
    randomize_adapter(model)
    with torch.no_grad():
        eager = model(input_ids())
    sparse, dense = model.model.layers  # layer 1 is dense (mlp_only_layers)
    compile_blocks(model, "torch")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()), eager, atol=1e-5, rtol=1e-5)
    assert "forward" not in sparse.__dict__  # the class's own forward: not wrapped, not compiled
    assert "attend" in sparse.__dict__  # its first half, x + attention(norm(x)), compiled on its own
    assert "forward" not in sparse.mlp.__dict__
    assert "forward" in dense.__dict__


def test_without_gradients_only_the_chosen_experts_run(moe_checkpoints):
    """Decoding a token runs its top_k experts, not all of them (a 128-expert model would otherwise launch every
    expert's kernels for each token); training runs all of them, so each takes part in the backward."""
    model = load_model(moe_checkpoints["mixtral"], dtype=torch.float32)
    moe = sparse_blocks(model)[0]
    calls = []
    hooks = [expert.register_forward_hook(lambda module, args, output: calls.append(module)) for expert in moe.experts]
    x = torch.randn(1, 1, model.config.hidden_size)
    with torch.no_grad():
        moe(x)
    assert len(calls) == 2  # one token, two experts
    calls.clear()
    moe(x)
    assert len(calls) == EXPERTS
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_plain_experts_laid_out_compute_together_and_let_a_decoding_step_be_recorded(family, moe_checkpoints,
                                                                                      tmp_path, monkeypatch):
    """Generation lays a model's plain (adapter-free) experts back to back (`litft generate`'s loading does): they
    then compute together in grouped GEMMs (CPU float32 here) with the logits of each expert on its own, read
    nothing on the host (`decode_graph_safe`, what lets DecodeStep record a CUDA graph), and the model still saves
    each expert's weight under its name."""
    from litft.adapters import lora_experts
    from litft.checkpoint import save_safetensors_shards
    from litft.commands.generate import load_for_generation

    monkeypatch.setattr(lora_experts, "ON_CPU", True)
    model = load_for_generation(moe_checkpoints[family], precision="32-true").model
    mixtures = sparse_blocks(model)
    gate_up_order, downs = lora_experts._kinds(lora_experts._projections(mixtures[0].experts))
    assert lora_experts._joint(gate_up_order, "weight") is not None and lora_experts._joint(downs, "weight") is not None
    ids = input_ids()
    with torch.no_grad():
        together = model(ids)
        assert model.decode_graph_safe
        monkeypatch.setattr(lora_experts, "ENABLED", False)
        one_by_one = model(ids)
        assert not model.decode_graph_safe
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-5)
    save_safetensors_shards(model.state_dict(), tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(saved[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_generation_with_an_expert_adapter_lays_it_out_with_the_adapted_logits(family, moe_checkpoints, tmp_path,
                                                                              monkeypatch):
    """`litft generate --checkpoint BASE --adapter DIR` on a mixture: the expert adapters are stacked and the frozen
    weights laid out, and the grouped GEMMs (CPU float32 here) give the adapted model's logits; the step reads
    nothing on the host."""
    from litft.adapters import lora_experts
    from litft.commands.generate import load_for_generation

    monkeypatch.setattr(lora_experts, "ON_CPU", True)
    checkpoint = moe_checkpoints[family]
    config = LoRAConfig(rank=8, alpha=16, targets=["all-linear"])  # the grouped GEMM aligns ranks to 8
    adapted_logits = write_adapter(checkpoint, tmp_path / "adapter", config)
    model = load_for_generation(checkpoint, adapter=tmp_path / "adapter", precision="32-true").model
    experts = sparse_blocks(model)[0].experts
    assert lora_experts._stacked_adapters(experts) is not None
    assert lora_experts._joint(lora_experts._kinds(lora_experts._projections(experts))[0], "weight") is not None
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()), adapted_logits, atol=1e-5, rtol=1e-5)
    assert model.decode_graph_safe and experts.__dict__["_grouped_plan"].plan is not None


def test_frozen_plain_experts_under_lora_of_attention_compute_together_with_their_input_gradient(moe_checkpoints,
                                                                                                   monkeypatch):
    """LoRA that leaves the experts out: join_frozen_weights lays the plain experts back to back and they run in
    grouped GEMMs in training too, with the input gradient of each expert on its own rows."""
    from litft.adapters import lora_experts
    from litft.adapters.lora_projections import join_frozen_weights

    monkeypatch.setattr(lora_experts, "ON_CPU", True)
    model = load_model(moe_checkpoints["qwen3_moe"], dtype=torch.bfloat16)
    apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=["q", "v"]))
    join_frozen_weights(model)
    moe = sparse_blocks(model)[0]
    x = torch.randn(3, 40, model.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    rows = x.detach().reshape(-1, x.shape[-1])[:64]
    ends = torch.full((EXPERTS,), 64, dtype=torch.int32)
    assert lora_experts.experts_together(moe.experts, rows, ends, torch.ones(64, dtype=torch.bfloat16)) is not None
    assert_grouped_equals_one_by_one(moe, x, torch.randn_like(x))


def test_expert_adapters_with_dropout_compute_together_each_with_its_own_dropout(moe_checkpoints, monkeypatch):
    """Adapter dropout in the grouped GEMMs, as each expert's three LoRA layers apply it: gate's and up's adapters
    each see their own dropout of the rows, down's one of h. Checked against the mixture computed by hand, expert by
    expert, with the very masks the grouped path drew (recorded): the output and the gradients of the rows and of
    every adapter. In evaluation no dropout applies (the plan follows the switch) and the grouped GEMMs compute
    what the experts compute one by one."""
    import torch.nn.functional as F

    from litft.adapters import lora_experts
    from litft.adapters.lora_projections import join_frozen_weights

    monkeypatch.setattr(lora_experts, "ON_CPU", True)
    model = load_model(moe_checkpoints["qwen3_moe"], dtype=torch.float32)
    apply_lora(model, LoRAConfig(rank=8, alpha=16, dropout=0.3, targets=["all-linear"]))
    randomize_adapter(model)
    join_frozen_weights(model)
    experts = sparse_blocks(model)[0].experts
    drawn = []
    dropped = lora_experts._dropped

    def recording(x, probability):
        result = dropped(x, probability)
        if probability:
            drawn.append(result.detach() != 0)  # the mask of kept values
        return result

    monkeypatch.setattr(lora_experts, "_dropped", recording)
    torch.manual_seed(0)
    rows = torch.randn(40, model.config.hidden_size, requires_grad=True)
    ends, weights = torch.tensor([10, 10, 25, 40]), torch.rand(40)  # expert 1 gets no row
    output = lora_experts.experts_together(experts, rows, ends, weights)
    assert output is not None and len(drawn) == 3  # gate's input, up's input, down's input
    gate_mask, up_mask, down_mask = drawn
    assert not gate_mask.all() and not torch.equal(gate_mask, up_mask)
    keep = 1 - 0.3

    def adapter(layer, inputs):
        return inputs @ layer.lora_A.weight.T @ layer.lora_B.weight.T * layer.scaling

    pieces = []
    for expert, (gate, up, down) in enumerate(lora_experts._projections(experts)):
        rows_of = slice(int(ends[expert - 1]) if expert else 0, int(ends[expert]))
        x = rows[rows_of]
        g = x @ gate.weight.T + adapter(gate, x * gate_mask[rows_of] / keep)
        u = x @ up.weight.T + adapter(up, x * up_mask[rows_of] / keep)
        h = F.silu(g) * u * weights[rows_of, None]
        pieces.append(h @ down.weight.T + adapter(down, h * down_mask[rows_of] / keep))
    expected = torch.cat(pieces)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    parameters = [rows, *(p for p in experts.parameters() if p.requires_grad)]
    probe = torch.randn_like(output)
    gradients = torch.autograd.grad((output * probe).sum(), parameters)
    for gradient, reference in zip(gradients, torch.autograd.grad((expected * probe).sum(), parameters)):
        torch.testing.assert_close(gradient, reference, atol=1e-5, rtol=1e-4)
    model.eval()
    drawn.clear()
    x = torch.randn(2, 40, model.config.hidden_size, requires_grad=True)
    assert_grouped_equals_one_by_one(sparse_blocks(model)[0], x, torch.randn_like(x))
    assert not drawn


def save_wide_moe(folder, experts: int = 4):
    """Experts of 256 x 256: 1,024 NF4 blocks each, whole groups of 256 block scales, so double-quantized experts
    can lie back to back (the tiny zoo's 32 blocks per expert cannot)."""
    from conftest import save_tiny_hf_model

    return save_tiny_hf_model(
        folder, "Qwen3MoeConfig", "Qwen3MoeForCausalLM", vocab_size=512,
        hidden_size=256, intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=experts, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=128, tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def wide_moe_checkpoint(tmp_path_factory):
    return save_wide_moe(tmp_path_factory.mktemp("wide_moe"))


def qlora_moe(checkpoint, dtype=torch.float32, device="cpu") -> nn.Module:
    def prepare(model: nn.Module) -> None:
        quantize_model(model, "bnb.nf4", compute_dtype=dtype)

    model = load_model(checkpoint, dtype=dtype, device=device, prepare=prepare)
    apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=["all-linear"]))
    randomize_adapter(model)
    return model


def test_4bit_experts_laid_back_to_back_dequantize_in_one_launch(wide_moe_checkpoint, monkeypatch):
    """QLoRA experts: join_frozen_weights lays each expert's NF4 tensors back to back (gate and up of each expert
    side by side, then the downs); the model computes what it did, and one launch of the kernel (in Triton's
    interpreter here) gives every expert's weight as each dequantizes alone, as it does where the experts lie apart
    (FSDP2) and their NF4 tensors are copied together for it."""
    from conftest import triton_interpreter

    from litft.adapters import lora_experts, nf4_dequantize
    from litft.adapters.lora_projections import join_frozen_weights

    model = qlora_moe(wide_moe_checkpoint)
    with torch.no_grad():
        logits = model(input_ids())
    join_frozen_weights(model)
    layers = lora_experts._projections(sparse_blocks(model)[0].experts)
    gate_up_order, down_order = lora_experts._kinds(layers)
    for ordered in (gate_up_order, down_order):  # every NF4 tensor of theirs lies back to back
        assert all(lora_experts._joint(ordered, name) is not None for name in lora_experts.QUANTIZED_TENSORS)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()), logits, atol=0, rtol=0)
    shape = (EXPERTS, 2 * 256, 256)
    apart = lora_experts._kinds(lora_experts._projections(sparse_blocks(qlora_moe(wide_moe_checkpoint))[0].experts))[0]
    with triton_interpreter(monkeypatch, nf4_dequantize._kernels):
        together = lora_experts._dequantized(gate_up_order, lora_experts._nf4_joint(gate_up_order), shape,
                                             torch.float32)
        each = lora_experts._dequantized_each(gate_up_order, shape, torch.float32)
        # Apart (FSDP2 gathers each weight into memory of its own): copied together for the one launch.
        assert lora_experts._nf4_joint(apart) is None
        copied = lora_experts._dequantized_copied_together(apart, shape, torch.float32)
    assert torch.equal(together, each)
    assert torch.equal(copied, each)


@pytest.mark.parametrize("adapted", [True, False])
def test_few_rows_of_4bit_experts_dequantize_only_their_own_experts(adapted, wide_moe_checkpoint, monkeypatch):
    """Given fewer rows than experts without gradients (decoding), each row has its own expert's 4-bit weights
    dequantized (one launch per projection kind, for those experts only) and multiplied row by row: the outputs of
    each expert on its own rows, for QLoRA experts and for plain 4-bit ones (`litft generate --quantize`), with no
    host read (the step can be recorded). With gradients (training) all experts are dequantized instead, as for
    many rows, so that no per-row weights wait for the backward. CPU, Triton's interpreter."""
    from conftest import triton_interpreter

    from litft.adapters import lora_experts, nf4_dequantize
    from litft.adapters.lora_projections import join_frozen_weights

    monkeypatch.setattr(lora_experts, "ON_CPU", True)
    if adapted:
        model = qlora_moe(wide_moe_checkpoint)
        join_frozen_weights(model)
    else:
        model = load_model(wide_moe_checkpoint, dtype=torch.float32,
                           prepare=lambda meta: quantize_model(meta, "bnb.nf4", compute_dtype=torch.float32))
        model.requires_grad_(False)
        assert lora_experts.lay_experts_back_to_back(model) == 1
    moe = sparse_blocks(model)[0]
    launches = []
    dequantize_nf4 = nf4_dequantize.dequantize_nf4

    def recording(*args, weight_count: int = 1, **kwargs):
        launches.append(weight_count)
        return dequantize_nf4(*args, weight_count=weight_count, **kwargs)

    monkeypatch.setattr(nf4_dequantize, "dequantize_nf4", recording)
    with triton_interpreter(monkeypatch, nf4_dequantize._kernels):
        rows, ends = torch.randn(3, 256), torch.tensor([1, 3, 3, 3])  # experts 0, 1, 1 (of 4)
        with torch.no_grad():
            launches.clear()
            assert lora_experts.experts_together(moe.experts, rows, ends, torch.ones(3)) is not None
            assert launches == [2 * 3, 3]  # gate and up of each row's expert, then its down
            x = torch.randn(1, 1, 256)  # one token, two experts: 2 rows
            together = moe(x)
            monkeypatch.setattr(lora_experts, "ENABLED", False)
            one_by_one = moe(x)
            monkeypatch.setattr(lora_experts, "ENABLED", True)
            torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-5)
            model(input_ids(batch=1, length=1))
            assert model.decode_graph_safe
        launches.clear()
        assert lora_experts.experts_together(moe.experts, rows, ends, torch.ones(3)) is not None
        assert launches == [2 * 4, 4]  # with gradients: every expert
        x = torch.randn(1, 1, 256, requires_grad=True)
        assert_grouped_equals_one_by_one(moe, x, torch.randn_like(x))


def test_few_rows_of_4bit_experts_whatever_their_count(tmp_path, monkeypatch):
    """The per-row dequantization gathers each expert's share of the laid-out tensors, but not the group scales'
    code table, which all experts share: with 3 experts (Qwen1.5-MoE has 60), whose count does not divide the
    table's 256 entries, the few-rows path still computes what the experts compute one by one."""
    from conftest import triton_interpreter

    from litft.adapters import lora_experts, nf4_dequantize

    monkeypatch.setattr(lora_experts, "ON_CPU", True)
    model = load_model(save_wide_moe(tmp_path, experts=3), dtype=torch.float32,
                       prepare=lambda meta: quantize_model(meta, "bnb.nf4", compute_dtype=torch.float32))
    model.requires_grad_(False)
    assert lora_experts.lay_experts_back_to_back(model) == 1
    moe = sparse_blocks(model)[0]
    with triton_interpreter(monkeypatch, nf4_dequantize._kernels), torch.no_grad():
        x = torch.randn(1, 1, 256)  # one token, two of the three experts: 2 rows
        together = moe(x)
        assert not moe.experts.__dict__["counts_read_on_host"]  # the few-rows path ran
        monkeypatch.setattr(lora_experts, "ENABLED", False)
        torch.testing.assert_close(together, moe(x), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_a_4bit_mixture_loaded_for_generation_decodes_from_a_cuda_graph(wide_moe_checkpoint):
    """`litft generate --quantize bnb.nf4` on a mixture: its 4-bit experts are laid out, a decoding step (a few rows)
    dequantizes only the chosen experts and reads nothing on the host, so the step is recorded in a CUDA graph, with
    the eager step's tokens."""
    from litft.commands.generate import load_for_generation
    from litft.generation import generate

    model = load_for_generation(wide_moe_checkpoint, precision="bf16-true", quantize="bnb.nf4").model
    prompts = [[5, 17, 99, 4], [8, 9]]
    with torch.inference_mode():
        assert two_decoding_steps(model).graph is not None
        eager = [r.token_ids for r in generate(model, prompts, 12, [], use_cuda_graph=False)]
        recorded = [r.token_ids for r in generate(model, prompts, 12, [])]
    assert recorded == eager and all(len(tokens) == 12 for tokens in eager)


@pytest.mark.gpu
@pytest.mark.parametrize("laid_out", [True, False])
def test_grouped_4bit_experts_compute_what_they_compute_one_by_one(laid_out, wide_moe_checkpoint):
    """Laid back to back (one GPU, DDP) or apart (FSDP2: their tensors copied together at each call)."""
    from litft.adapters import lora_experts
    from litft.adapters.lora_projections import join_frozen_weights

    model = qlora_moe(wide_moe_checkpoint, torch.bfloat16, "cuda")
    if laid_out:
        join_frozen_weights(model)
    else:
        lora_experts.stack_mixture_adapters(model)
    moe = sparse_blocks(model)[0]
    layers = lora_experts._projections(moe.experts)
    assert (lora_experts._joint(lora_experts._kinds(layers)[1], "weight_absmax") is not None) == laid_out
    x = torch.randn(2, 64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    rows = x.detach().reshape(-1, 256)
    ends = torch.full((EXPERTS,), rows.shape[0], dtype=torch.int32, device="cuda")
    weights = torch.ones(rows.shape[0], dtype=torch.bfloat16, device="cuda")
    assert lora_experts.experts_together(moe.experts, rows, ends, weights) is not None
    assert moe.experts.__dict__["_grouped_plan"].plan.holds_views == laid_out
    assert_grouped_equals_one_by_one(moe, x, torch.randn_like(x))


# ---------------------------------------------------------------------------------------------------------------
# The routers' load-balancing loss (--train.router_aux_loss_coef)


def padded_batch(vocab: int = 512) -> dict[str, torch.Tensor]:
    """Two rows, the second right-padded: input ids, next-token targets (-100 past each row's end) and the mask of
    real tokens, as SupervisedObjective.collate makes them."""
    generator = torch.Generator().manual_seed(3)
    lengths = [12, 7]
    ids = torch.randint(0, vocab, (2, 12), generator=generator)
    mask = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
    ids = ids.masked_fill(~mask, 0)
    targets = ids.roll(-1, dims=1).masked_fill(~mask.roll(-1, dims=1), -100)
    targets[:, -1] = -100
    return {"input_ids": ids, "targets": targets, "token_mask": mask}


def test_batches_carry_the_mask_of_real_tokens_only_for_the_balancing_loss():
    """The balancing loss counts real tokens, so its batches mark them (padding False); other runs' batches do not
    build or move that mask."""
    from litft.training.objectives import SupervisedObjective

    rows = [[{"input_ids": torch.tensor([5, 6, 7]), "targets": torch.tensor([6, 7, -100])}],
            [{"input_ids": torch.tensor([8, 9]), "targets": torch.tensor([9, -100])}]]
    assert "token_mask" not in SupervisedObjective(pad_id=0).collate(rows)
    mask = SupervisedObjective(pad_id=0, token_mask=True).collate(rows)["token_mask"]
    assert mask.tolist() == [[True, True, True], [True, True, False]]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_router_loss_and_gradients_equal_transformers_with_router_logits(family, moe_checkpoints):
    """With --train.router_aux_loss_coef, one micro-batch's loss (summed, then divided by its trained tokens) is
    transformers' loss with `output_router_logits` and that `router_aux_loss_coef`, padding left out of the
    balancing loss by the mask; the routers' gradients (full fine-tuning) match transformers' too."""
    import transformers

    from litft.training.loss import CausalLMObjective

    coefficient = 0.05
    checkpoint = moe_checkpoints[family]
    batch = padded_batch()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, output_router_logits=True, router_aux_loss_coef=coefficient
    )
    labels = batch["input_ids"].masked_fill(~batch["token_mask"], -100)
    expected = reference(input_ids=batch["input_ids"], attention_mask=batch["token_mask"].long(), labels=labels).loss
    expected.backward()
    model = load_model(checkpoint, dtype=torch.float32).requires_grad_(True)
    objective = CausalLMObjective(model, router_aux_loss_coef=coefficient)
    trained = (batch["targets"] != -100).sum()
    loss = objective(batch["input_ids"], batch["targets"], token_mask=batch["token_mask"]) / trained
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    without = CausalLMObjective(model)(batch["input_ids"], batch["targets"]) / trained
    assert (loss - without).item() > 0.025  # the balancing loss is there (top_k = 2 for an even router, times 0.05)
    loss.backward()
    moe = "block_sparse_moe" if family == "mixtral" else "mlp"
    for name, parameter in model.named_parameters():
        if name.endswith(f"{moe}.gate.weight"):  # transformers 5 calls Mixtral's block `mlp` too
            expected_gradient = reference.get_parameter(name.replace("block_sparse_moe", "mlp")).grad
            torch.testing.assert_close(parameter.grad, expected_gradient, atol=1e-5, rtol=1e-4, msg=name)


def test_router_loss_is_the_same_under_checkpointing_and_tiles(moe_checkpoints):
    """Recomputed blocks (activation checkpointing) and MLP tiles give the same balancing loss and the same router
    gradients as the plain forward: the routers' outputs that escape a checkpoint still take their gradient."""
    from litft.training.loss import CausalLMObjective
    from litft.training.strategies import enable_activation_checkpointing
    from litft.training.tiling import enable_tiled_mlp

    batch = padded_batch()
    results = []
    for variant in ("plain", "checkpointed", "tiled"):
        model = load_model(moe_checkpoints["qwen3_moe"], dtype=torch.float32).requires_grad_(True)
        if variant == "checkpointed":
            enable_activation_checkpointing(model)
        elif variant == "tiled":
            enable_tiled_mlp(model, 5)
        objective = CausalLMObjective(model, router_aux_loss_coef=0.1)
        loss = objective(batch["input_ids"], batch["targets"], token_mask=batch["token_mask"])
        loss.backward()
        routers = [p.grad.clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
        results.append((loss.detach(), routers))
    (plain, plain_routers), *others = results
    for loss, routers in others:
        torch.testing.assert_close(loss, plain, atol=1e-5, rtol=1e-6)
        for gradient, expected in zip(routers, plain_routers):
            torch.testing.assert_close(gradient, expected, atol=1e-6, rtol=1e-4)


def test_router_loss_flag_fine_tunes_a_mixture_and_refuses_what_it_cannot_do(moe_checkpoints, tiny_llama_dir,
                                                                            tmp_path, capsys):
    """`--train.router_aux_loss_coef` trains (its first loss above the plain run's by the coefficient times the
    balancing loss, about top_k = 2 for a router near even), and stops with one line on a model without routers,
    with offloaded checkpointing and below 0."""
    checkpoint = moe_checkpoints["qwen3_moe"]
    flags = ("--train.max_steps", "1", "--data.limit", "8", "--train.global_batch_size", "4")
    finetune("full", checkpoint, tmp_path / "plain", *flags)
    finetune("full", checkpoint, tmp_path / "balanced", *flags, "--train.router_aux_loss_coef", "0.5")
    plain, balanced = (read_metrics(tmp_path / name)[1]["train/loss"] for name in ("plain", "balanced"))
    assert balanced > plain + 0.5 * 1.0
    # The balancing loss is logged apart, and the two losses differ by the coefficient times it.
    logged = read_metrics(tmp_path / "balanced")[1]["train/router_aux_loss"]
    assert balanced - plain == pytest.approx(0.5 * logged, rel=1e-4)
    assert "train/router_aux_loss" not in read_metrics(tmp_path / "plain")[1]
    for directory, extra, message in (
        (tiny_llama_dir, ("--train.router_aux_loss_coef", "0.01"), "has no mixture of experts"),
        (checkpoint, ("--train.router_aux_loss_coef", "0.01", "--train.activation_checkpointing", "offload"),
         "offload is not supported"),
        (checkpoint, ("--train.router_aux_loss_coef", "-1"), "must be 0 or more"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            finetune("full", directory, tmp_path / "refused", *flags, *extra)
        assert exit_info.value.code != 0
        error = capsys.readouterr().err.strip().splitlines()
        assert message in error[-1] and "Traceback" not in "\n".join(error)
