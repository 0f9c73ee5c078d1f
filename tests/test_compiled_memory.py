"""What a compiled LoRA decoder block keeps for the backward, under the partitioner settings `--compile` uses: cheap
elementwise results that feed matmuls (the normed inputs, SwiGLU's product) are recomputed, not stored."""

from __future__ import annotations

import pytest
import torch
from functorch.compile import min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd

from litft.adapters.lora import LoRAConfig, apply_lora
from litft.models import build_model
from litft.models.common import build_attention_context, default_position_ids
from litft.training.compilation import PARTITIONER_SETTINGS, compile_blocks


def saved_activations(settings: dict) -> list[tuple[tuple[int, ...], str]]:
    """The (shape, node name) of every tensor the compiled block's forward saves for its backward."""
    torch.manual_seed(0)
    config = {
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 128, "tie_word_embeddings": False,
    }
    model = build_model(config)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["all-linear"]))
    saved: list[tuple[tuple[int, ...], str]] = []

    def record_forward(graph_module, example_inputs):
        output = next(node for node in graph_module.graph.nodes if node.op == "output")
        for node in output.args[0][1:]:
            value = node.meta.get("val") if node is not None else None
            if isinstance(value, torch.Tensor) and not node.name.startswith("primals"):
                saved.append((tuple(value.shape), node.name))
        return graph_module.forward

    backend = aot_autograd(
        fw_compiler=record_forward, bw_compiler=lambda graph_module, _: graph_module.forward,
        partition_fn=min_cut_rematerialization_partition,
    )
    tokens = 16
    x = torch.randn(1, tokens, config["hidden_size"], requires_grad=True)
    positions = default_position_ids(1, tokens, 0, x.device)
    cos, sin = model.model.rotary_emb(positions)
    context = build_attention_context(1, tokens, x.device, None, None, None)
    torch._dynamo.reset()
    with torch._functorch.config.patch(**settings):
        compiled = torch.compile(model.blocks[0], backend=backend)
        compiled(x, cos, sin, context).sum().backward()
    return saved


def intermediate_sized(saved, intermediate: int) -> list:
    """The saved activations (batch, tokens, intermediate): not the stacked LoRA factors, which are weight-sized."""
    return [entry for entry in saved if len(entry[0]) == 3 and entry[0][-1] == intermediate]


def saved_elements(saved) -> int:
    return sum(torch.Size(shape).numel() for shape, _ in saved)


def test_compiled_block_recomputes_the_swiglu_product_instead_of_saving_it(monkeypatch):
    """Where the product is computed as written (a down projection without LoRA's gated operator: adapter dropout,
    full fine-tuning), litft's partitioner settings rebuild it in the backward; through the operator
    (`litft.adapters.lora_gated_down`) it is never a saved tensor, whatever the settings."""
    from litft.adapters import lora_gated_down

    intermediate = 96
    # torch's own default, set explicitly: compile_blocks changes the process-wide setting, other tests call it
    torch_default = {name: not value for name, value in PARTITIONER_SETTINGS.items()}
    through_operator = saved_activations(torch_default)
    monkeypatch.setattr(lora_gated_down, "ENABLED", False)
    default = saved_activations(torch_default)
    lean = saved_activations(PARTITIONER_SETTINGS)
    # By default: gate, up and their product; with litft's settings only gate and up (the product is rebuilt).
    assert len(intermediate_sized(default, intermediate)) == 3, default
    assert len(intermediate_sized(lean, intermediate)) == 2, lean
    assert saved_elements(lean) < 0.8 * saved_elements(default)
    assert len(intermediate_sized(through_operator, intermediate)) == 2, through_operator


def test_compile_blocks_applies_the_partitioner_settings():
    """`--compile` goes through compile_blocks: the settings tested above must be the ones it switches on."""
    model = build_model({
        "model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 128, "tie_word_embeddings": False,
    })
    torch_defaults = {name: not value for name, value in PARTITIONER_SETTINGS.items()}
    with torch._functorch.config.patch(**torch_defaults):
        compile_blocks(model, "torch")
        for name, value in PARTITIONER_SETTINGS.items():
            assert getattr(torch._functorch.config, name) == value, name


@pytest.mark.parametrize("together", [True, False])
def test_compiled_lora_adds_its_update_elementwise_not_through_addmm(together):
    """Compiled, a LoRA layer is one opaque operator (`litft::lora_projections`, whose base GEMM adds into the
    update in its epilogue); where it computes on its own (dropout, a float8 base), the rank-deep update is its own
    GEMM and a plain add that fuses into the next elementwise kernel. Never an addmm: inductor lowers it to a copy
    of the addend plus a GEMM reading and writing it again (1.6x slower on llama-8b's MLP projections,
    benchmarks/NOTES.md section 7)."""
    from torch import nn

    from litft.adapters.lora import LoRALinear

    layer = LoRALinear(nn.Linear(32, 48, bias=False).requires_grad_(False), LoRAConfig(rank=4, alpha=8))
    layer.compute_together = together
    operators: list[str] = []

    def record_forward(graph_module, example_inputs):
        operators.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    backend = aot_autograd(fw_compiler=record_forward, bw_compiler=lambda graph_module, _: graph_module.forward)
    x = torch.randn(2, 5, 32, requires_grad=True)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(compiled, layer(x))
    assert "aten.addmm.default" not in operators
    if together:
        assert operators.count("litft.lora_projections.default") == 1, operators
        assert "aten.mm.default" not in operators, operators
    else:
        assert operators.count("aten.mm.default") == 3, operators  # base, A, B
        assert "aten.add.Tensor" in operators
