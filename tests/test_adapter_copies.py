"""A decoder block's adapters cast once per call (`litft.adapters.adapter_copies`): the same step bit for bit as the
per-operator casts, the copies really read, nothing left on the layers after the call."""

from __future__ import annotations

import functools

import pytest
import torch
from test_lora import input_ids, randomize_adapter
from torch import nn
from torch.utils.checkpoint import checkpoint

from litft.adapters import adapter_copies
from litft.adapters.adapter_copies import BlockAdapterCopies, wrap_block_forward
from litft.adapters.lora import LoRAConfig, adapters_disabled, apply_lora, lora_modules
from litft.adapters.lora_projections import join_frozen_weights
from litft.checkpoint import load_model
from litft.training.compilation import compile_blocks
from litft.training.loss import CausalLMObjective
from litft.training.strategies import enable_activation_checkpointing


def lora_model(checkpoint_dir, dtype: torch.dtype = torch.float32, **lora_options) -> nn.Module:
    model = load_model(checkpoint_dir, dtype=dtype)
    options = {"rank": 4, "targets": ["all-linear"], **lora_options}
    apply_lora(model, LoRAConfig(**options))
    randomize_adapter(model)
    return model.train()


def wrap_blocks(model: nn.Module) -> None:
    for block in model.blocks:
        block.forward = wrap_block_forward(block, block.forward)


def step(model: nn.Module, accumulate: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and adapter gradients over `accumulate` micro-batches (gradients summed, as accumulation does)."""
    losses = []
    for index in range(accumulate):
        ids = input_ids(seed=index, batch=2, length=16)
        loss = CausalLMObjective(model)(ids, ids.roll(-1, dims=1))
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def graph_nodes(tensor: torch.Tensor) -> set[str]:
    """The names of every autograd node `tensor` was computed through."""
    seen, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("joined", [False, True], ids=["apart", "joined"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("lora_options", [{}, {"targets": ["q", "v", "down"]}, {"rslora": True, "alpha": 3.0}],
                         ids=["all-linear", "q,v,down", "rslora"])
def test_the_copies_compute_the_same_step_bit_for_bit(tiny_llama_dir, dtype, lora_options, joined):
    """Two micro-batches, so the gradients that the copies hand back also accumulate. In bfloat16 the values would
    differ if the scaling were applied after rounding A, or the gradient scaled before it was cast to float32.
    `joined`: q/k/v in one base GEMM (as training sets them up), which reads the prepared diag(B_q, B_k, B_v)."""
    reference, wrapped = lora_model(tiny_llama_dir, dtype, **lora_options), lora_model(tiny_llama_dir, dtype,
                                                                                        **lora_options)
    if joined:
        assert join_frozen_weights(reference) == join_frozen_weights(wrapped) == (2 if not lora_options.get(
            "targets") else 0)
    wrap_blocks(wrapped)
    reference_losses, reference_grads = step(reference, accumulate=2)
    losses, grads = step(wrapped, accumulate=2)
    assert torch.equal(losses, reference_losses)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        assert torch.equal(grad, reference_grads[name]), name


def test_diagonal_positions_lay_each_b_into_its_block():
    shapes = [[(3, 2), (2, 1), (4, 2)], [(2, 3), (1, 3)]]
    factors = [[torch.randn(shape) for shape in group] for group in shapes]
    flat = torch.cat([factor.reshape(-1) for group in factors for factor in group])
    laid = torch.zeros(sum(sum(r for r, _ in g) * sum(c for _, c in g) for g in shapes))
    laid[adapter_copies.diagonal_positions(shapes)] = flat
    first, second = laid.split([9 * 5, 3 * 6])
    assert torch.equal(first.view(9, 5), torch.block_diag(*factors[0]))
    assert torch.equal(second.view(3, 6), torch.block_diag(*factors[1]))


def test_the_layers_read_the_copies_and_keep_nothing_after_the_call(tiny_llama_dir):
    model = lora_model(tiny_llama_dir, torch.bfloat16)
    wrap_blocks(model)
    ids = input_ids(batch=1, length=8)
    loss = CausalLMObjective(model)(ids, ids.roll(-1, dims=1))
    # Each block's adapters reach the loss through one copying node, not through a cast per layer.
    assert "_AdapterCopiesBackward" in graph_nodes(loss)
    # Changing a copy changes the output: the operators read it (not a cast of their own).
    block = model.blocks[0]
    wrapper, block_forward = block.forward, block.forward.forward

    def with_a_wrong_copy(*args, **kwargs):
        block.self_attn.q_proj.prepared_lora_b.mul_(3)
        return block_forward(*args, **kwargs)

    with torch.no_grad():
        before = CausalLMObjective(model)(ids, ids.roll(-1, dims=1))
        wrapper.forward = with_a_wrong_copy
        try:
            changed = CausalLMObjective(model)(ids, ids.roll(-1, dims=1))
        finally:
            wrapper.forward = block_forward
    assert not torch.equal(before, changed)
    for layer in lora_modules(model).values():
        assert layer.prepared_lora_a is None and layer.prepared_lora_b is None


def test_groups_follow_the_model_and_switched_off_adapters_take_no_copies(tiny_llama_dir):
    model = lora_model(tiny_llama_dir)
    wrapper = BlockAdapterCopies(model.blocks[0], model.blocks[0].forward)
    names = {id(module): name for name, module in model.blocks[0].named_modules()}
    assert [[names[id(layer)] for layer in group] for group in wrapper.groups] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"],
        ["self_attn.o_proj"], ["mlp.down_proj"],
    ]
    with adapters_disabled(model):
        assert wrapper._computing_groups() == []
    adapter_copies.ENABLED = False
    try:
        assert wrapper._computing_groups() == []
    finally:
        adapter_copies.ENABLED = True
    assert len(wrapper._computing_groups()) == 4


def test_adapters_off_pass_inside_a_wrapped_block_is_the_base_model(tiny_llama_dir):
    """DPO's reference pass: a wrapped block with adapters switched off computes the base weights alone."""
    model, base = lora_model(tiny_llama_dir), load_model(tiny_llama_dir, dtype=torch.float32)
    wrap_blocks(model)
    ids = input_ids(batch=1, length=8)
    with torch.no_grad(), adapters_disabled(model):
        assert torch.equal(model(ids), base(ids))


@pytest.mark.parametrize("checkpointing", ["recompute", "offload"])
def test_a_recomputed_block_prepares_its_own_copies(tiny_llama_dir, checkpointing):
    """Under activation checkpointing the wrapper sits inside the checkpoint (as `compile_blocks` places it): the
    recomputation in the backward, after the call's copies were taken off the layers, prepares its own."""
    reference, wrapped = lora_model(tiny_llama_dir), lora_model(tiny_llama_dir)
    enable_activation_checkpointing(wrapped, offload=checkpointing == "offload")
    for block in wrapped.blocks:
        offload = getattr(block, "activation_offload", None)
        if offload is not None:
            offload.inner_forward = wrap_block_forward(block, offload.inner_forward)
        else:
            inner = block.forward.args[0]
            block.forward = functools.partial(checkpoint, wrap_block_forward(block, inner), use_reentrant=False)
    reference_losses, reference_grads = step(reference)
    losses, grads = step(wrapped)
    assert torch.equal(losses, reference_losses)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("checkpointing", [None, "recompute"])
def test_compiled_blocks_run_inside_the_wrapper(tiny_llama_dir, checkpointing):
    """`compile_blocks` puts the wrapper around each compiled forward (inside the checkpoint when there is one),
    and the compiled step matches the eager one."""
    reference, compiled = lora_model(tiny_llama_dir), lora_model(tiny_llama_dir)
    if checkpointing:
        enable_activation_checkpointing(compiled)
    torch._dynamo.reset()
    compile_blocks(compiled, "torch")
    for block in compiled.blocks:
        wrapper = block.forward.args[0] if checkpointing else block.forward
        assert isinstance(wrapper, BlockAdapterCopies)
    # The micro-batch `step` trains on first: its graphs are the ones compiled here (another shape would compile a
    # second, dynamic set).
    ids = input_ids(seed=0, batch=2, length=16)
    assert "_AdapterCopiesBackward" in graph_nodes(CausalLMObjective(compiled)(ids, ids.roll(-1, dims=1)))
    compiled.zero_grad()
    reference_losses, reference_grads = step(reference)
    losses, grads = step(compiled)
    torch.testing.assert_close(losses, reference_losses, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_compiled_blocks_with_copies_train_like_without(monkeypatch):
    """bf16 on the GPU, compiled, q/k/v joined and gate/up through the gated kernel (which read the prepared
    diag(B)), the LoRA GEMM kernel forced: the same loss and gradients with the copies as with each operator casting
    its own (the same values in the same operators, so equal up to the compiled graphs' own differences)."""
    from conftest import random_lora_model

    monkeypatch.setenv("LITFT_LORA_GEMM", "triton")
    config = {
        "model_type": "llama", "vocab_size": 256, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False,
    }
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(adapter_copies, "ENABLED", enabled)
        model = random_lora_model(config, dtype=torch.bfloat16, rank=16, alpha=32).cuda().train()
        assert join_frozen_weights(model) == 2
        torch._dynamo.reset()
        compile_blocks(model, "torch")
        ids = torch.randint(0, 256, (2, 256), generator=torch.Generator().manual_seed(0)).cuda()
        loss = CausalLMObjective(model)(ids, ids.roll(-1, dims=1))
        assert ("_AdapterCopiesBackward" in graph_nodes(loss)) == enabled
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), (reference_loss, reference_grads) = results
    torch.testing.assert_close(loss, reference_loss, rtol=1e-3, atol=1e-3)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=2e-2, atol=2e-3, msg=name)
