"""Compiling the decoder blocks for training: `--compile` with `--compiler torch` (torch.compile, the default) or
`--compiler thunder` (lightning-thunder's `thunder.jit`).

The unit is one decoder block either way, and the block module stays where it is: torch.compile goes through
`nn.Module.compile`, thunder replaces the block's `forward` on the instance. Parameter names, state_dict keys and
the modules that FSDP2 shards and activation checkpointing wraps are those of the eager model, so checkpoints,
adapters and resumed runs do not depend on the compiler. With offloaded activation checkpointing the compiler
takes the block's inner forward instead (`OffloadedBlocks` in litft.training.strategies): its wrapper moves
tensors between streams, which neither compiler can trace.

thunder, as released (0.2.6), needs six things from litft that are set up here: a fusion executor (its wheel has
no nvFuser; thunder's torch.compile executor fuses instead), an SDPA that takes `enable_gqa`, an autocast rule for
LoRA's `addmm`, a cache that tells DPO's adapters-off reference pass from the policy pass, dense attention masks for
packed rows (no flex_attention), and LoRA layers computed one by one (it cannot trace the custom operators that
compute them together). Refused before training starts: a quantized (QLoRA) base, whose dequantizing matmul
operator thunder cannot trace, and dropout under activation checkpointing, whose recomputation thunder runs with
other dropout masks than the forward. thunder traces once per input shape (~20 s, most of it thunder interpreting
the block's Python), so packed rows (one shape) suit it best; blocks built alike share the first one's trace (each
runs it with its own tensors swapped in) instead of ~20 s each.
"""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from litft.errors import ConfigError

COMPILERS = ("torch", "thunder")
# torch.compile's partitioner decides what the forward keeps for the backward. By default it never recomputes a
# value that the backward must write to memory for a matmul anyway; but LoRA's A-gradient is such a matmul for
# every projection, so the normed block inputs and SwiGLU's product were all kept. Recomputing them costs a few
# elementwise kernels and saves 32% of each block's activations (llama-8b LoRA: 40.5 instead of 50.8 GiB at the
# same speed; benchmarks/NOTES.md, section 5).
PARTITIONER_SETTINGS = {"ban_recompute_materialized_backward": False}
# How many graphs dynamo may compile for one block's forward before it runs new variants eagerly (see
# `compile_blocks`). A block recompiled for every layer (session 6: a guard on each module's identity) still shows
# in the graph counts that tests/test_compilation.py asserts.
BLOCK_GRAPH_LIMIT = 32


def resolve_compiler(compile: bool, compiler: str, quantize: str | None = None) -> str | None:
    """The compiler a run uses, or None for eager: `--compiler thunder` implies `--compile`; `--compile` alone
    means torch.compile. Refuses, before anything is loaded, an unknown compiler and a thunder run that could
    not start (thunder not importable, or a quantized base)."""
    if compiler not in COMPILERS:
        raise ConfigError(f"--compiler {compiler!r}: choose one of {', '.join(COMPILERS)}")
    if compiler == "thunder":
        if quantize is not None:
            raise quantized_base_error(f"--quantize {quantize}")
        import_thunder()
        return compiler
    return compiler if compile else None


def compile_blocks(model: nn.Module, compiler: str) -> None:
    """Compiles each decoder block of `model` (a litft `CausalLM`) in place with `compiler`, "torch" or "thunder".

    Call it after activation checkpointing is enabled and before Fabric sets the model up: the compiled forward
    then contains the recomputation, and the strategy's hooks run around it."""
    if compiler not in COMPILERS:
        raise ConfigError(f"--compiler {compiler!r}: choose one of {', '.join(COMPILERS)}")
    if compiler == "torch":
        for name, value in PARTITIONER_SETTINGS.items():
            setattr(torch._functorch.config, name, value)
        # One block's forward has up to eight graphs in a training step alone: the first block's input needs no
        # gradient, the others' do; offloaded checkpointing runs the forward without autograd and the recomputation
        # with it; rows of varying length compile a static graph first and then a dynamic one. Evaluation (no
        # autograd, another batch size) adds more. Past dynamo's limit (8 by default) a new variant runs eagerly:
        # seen on the quickstart with offloading, whose evaluation then ran uncompiled.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_GRAPH_LIMIT)
        from litft.adapters.adapter_copies import BlockAdapterCopies, has_lora_layers, wrap_block_forward
        from litft.adapters.lora_experts import COMPILE_ELEMENTWISE

        for block in model.blocks:
            offload = getattr(block, "activation_offload", None)
            forward = block.forward
            if has_mixture_of_experts(block):
                # The block stays eager: the mixture's routing breaks the graph, and the compiled halves around it
                # ran a Qwen3-MoE LoRA step at 16,679 tok/s against 27,022 eagerly (H200, benchmarks/NOTES.md, section
                # 24). Its first half, x + attention(norm(x)), compiles on its own where the block's forward is its
                # class's own (not wrapped for checkpointing): eagerly the LoRA operators' dispatch cost the host
                # ~0.6 ms per call, and the norm and rotary embedding ran as separate kernels. The adapter copies
                # are the attention's (the experts read their own).
                if hasattr(block, "attend") and offload is None and "forward" not in vars(block):
                    block.attend = wrap_block_forward(block.self_attn, torch.compile(block.attend))
                for module in block.modules():  # the experts' elementwise work, compiled apart from the routing
                    if isinstance(getattr(module, "experts", None), nn.ModuleList):
                        module.experts.__dict__[COMPILE_ELEMENTWISE] = True
                continue
            # A LoRA block's compiled forward runs inside a wrapper that casts its adapters for the call in a few
            # kernels (`litft.adapters.adapter_copies`); the wrapper stays out of the graph, inside any checkpoint,
            # so that a recomputation prepares its own.
            if offload is not None:
                offload.inner_forward = wrap_block_forward(block, torch.compile(offload.inner_forward))
            elif isinstance(forward, functools.partial) and forward.func is checkpoint:
                # Dynamo does not trace into torch.utils.checkpoint when it is the outermost call of the compiled
                # frame (it compiled nothing at all): compile the block's own forward inside the checkpoint instead.
                block.forward = functools.partial(
                    checkpoint, wrap_block_forward(block, torch.compile(forward.args[0])), *forward.args[1:],
                    **forward.keywords,
                )
            elif has_lora_layers(block):
                block.forward = BlockAdapterCopies(block, torch.compile(forward))
            else:
                block.compile()
        return
    refuse_what_thunder_cannot_compile(model)
    thunder = import_thunder()
    allow_grouped_query_attention()
    autocast_lora_updates()
    # thunder cannot trace flex_attention (a torch.compile'd function), which packed rows take on CUDA, nor
    # FlashAttention-4's custom operator: they attend through SDPA instead, in every model of this process.
    from litft.adapters.lora import set_compute_together
    from litft.models import common, flash_attention

    common.FLEX_ATTENTION = "never"
    flash_attention.FLASH_ATTENTION_4 = "never"
    set_compute_together(model, False)  # thunder cannot trace the grouped LoRA operators (custom operators)
    first_alike: dict[tuple, ThunderCompiledForward] = {}
    for block in model.blocks:
        offload = getattr(block, "activation_offload", None)
        eager_forward = offload.inner_forward if offload is not None else block.forward
        compiled = ThunderCompiledForward(block, eager_forward, thunder)
        compiled.shares_with(first_alike.setdefault(block_build(block), compiled))
        if offload is not None:
            offload.inner_forward = compiled
        else:
            # A forward on the instance shadows the class's; `nn.Module.__call__` and so every hook still run.
            # With activation checkpointing it is `checkpoint(forward)`, which thunder traces with its own support.
            block.forward = compiled


# Block attributes that a thunder trace does not read: the KV-cache slot (read only when decoding, which runs
# eagerly) and offloaded checkpointing's wrapper, which calls the traced forward.
UNTRACED_ATTRIBUTES = frozenset({"layer_idx", "activation_offload"})


def _plain(value: Any) -> Any:
    """A value as `block_build` compares it: numbers, strings and containers of them by value, anything else
    (a tensor that is not a parameter or buffer, a function, an object) by identity."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_plain(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((repr(key), _plain(item)) for key, item in value.items()))
    return ("object", id(value))


def block_build(block: nn.Module) -> tuple:
    """What a thunder trace of `block` depends on besides its tensors' values: each submodule's class, plain
    attributes (widths, eps, sliding-window or not, LoRA scaling and dropout, ...) and hooks, and each parameter's
    and buffer's name, shape, dtype, device and whether it trains. Blocks of equal builds compute alike given their
    own tensors."""
    parts = []
    for name, module in block.named_modules():
        attributes = tuple(sorted(
            (key, _plain(value)) for key, value in vars(module).items()
            if not key.startswith("_") and key not in UNTRACED_ATTRIBUTES and key != "forward"
        ))  # an instance's own `forward` (ours, or adapters_disabled's) is compared when the block runs
        # A submodule's hooks run inside the trace (the block's own run around it, in the block's `__call__`).
        hooks = () if not name else tuple(
            id(hook) for hooks in (module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks,
                                   module._backward_hooks) for hook in hooks.values()
        )
        parts.append((name, type(module), attributes, hooks))
    for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
        parts.append((name, tuple(tensor.shape), tensor.dtype, tensor.device, tensor.requires_grad))
    return tuple(parts)


def has_mixture_of_experts(module: nn.Module) -> bool:
    """Whether `module` (a block, or a whole model) holds a mixture of experts."""
    from litft.models.llama import SparseMoE

    return any(isinstance(inner, SparseMoE) for inner in module.modules())


def refuse_what_thunder_cannot_compile(model: nn.Module) -> None:
    """Refuses, before training starts, the models that thunder would fail on or train wrongly."""
    for name, module in model.named_modules():
        if getattr(module, "quantization", None) is not None:
            raise quantized_base_error(name)
    from litft.training.tiling import TiledForward, block_mlp

    if any(has_mixture_of_experts(block) for block in model.blocks):
        raise ConfigError(
            "--compiler thunder does not support mixtures of experts (their routing reads token counts on the host); "
            "use --compiler torch, which leaves a mixture's blocks eager and compiles the others"
        )
    if any(isinstance(block_mlp(block).forward, TiledForward) for block in model.blocks):
        raise ConfigError(
            "--compiler thunder with --train.mlp_tile_tokens is not supported (thunder cannot run the tiles' "
            "checkpoints); use --compiler torch, or leave --train.mlp_tile_tokens unset"
        )
    for block in model.blocks:
        forward = block.forward
        checkpointed = hasattr(block, "activation_offload") or (
            isinstance(forward, functools.partial) and forward.func is checkpoint
        )
        if checkpointed and any(isinstance(module, nn.Dropout) and module.p > 0 for module in block.modules()):
            # Measured with thunder 0.2.6: the recomputation draws other dropout masks than the forward did (and
            # thunder cannot run inside torch's checkpoint instead), so the gradient would not be the forward's.
            raise ConfigError(
                "--compiler thunder with activation checkpointing needs --lora.dropout 0: thunder's recomputation "
                "draws other dropout masks than its forward, so the gradients would be wrong; set --lora.dropout 0, "
                "--train.activation_checkpointing false, or use --compiler torch"
            )


class ThunderCompiledForward:
    """A decoder block's `forward` compiled by thunder, keeping apart the calls that thunder's cache cannot.

    thunder checks on every call that what its trace read (input shapes and dtypes, parameters, `training`, grad
    mode) is unchanged, but not which `forward` a submodule runs. `adapters_disabled` (the reference pass of DPO
    and SimPO with adapters) swaps the LoRA layers' forward on the instance, so each set of swapped submodules
    gets its own compiled function. Decoding with a KV cache (the samples shown during training) runs eagerly:
    its shapes change at every step, and thunder traces every new shape anew.

    Blocks built alike (`block_build`) share one trace: thunder's checks read the tensors, not which tensors they
    are, so a block runs the first alike block's compiled function with its own parameters and buffers put in that
    block's place for the call (and back after). Its autograd graph records its own tensors, so its gradients are
    its own. A block whose state differs from the first's at the call (another `training`, other swapped
    forwards) compiles its own."""

    def __init__(self, block: nn.Module, eager_forward: Callable[..., Any], thunder: ModuleType) -> None:
        self.block = block
        self.eager_forward = eager_forward  # the class's forward, or activation checkpointing's wrapper of it
        self.thunder = thunder
        self.compiled_by_swapped_forwards: dict[tuple[str, ...], Callable[..., Any]] = {}
        self.first_alike: ThunderCompiledForward | None = None
        self.tensor_places: list[tuple[dict, dict, str]] = []

    def shares_with(self, first: ThunderCompiledForward) -> None:
        """Runs `first`'s trace with this block's tensors (nothing to do when this is the first)."""
        if first is self:
            return
        self.first_alike = first
        # (the first block's dict, this block's dict, key): the places to swap, found once
        for name, _ in [*self.block.named_parameters(), *self.block.named_buffers()]:
            owner_name, _, key = name.rpartition(".")
            mine, theirs = self.block.get_submodule(owner_name), first.block.get_submodule(owner_name)
            store = "_parameters" if key in mine._parameters else "_buffers"
            self.tensor_places.append((getattr(theirs, store), getattr(mine, store), key))

    def swapped_forwards(self) -> tuple[str, ...]:
        return tuple(name for name, module in self.block.named_modules() if name and "forward" in vars(module))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if any(getattr(argument, "kv_cache", None) is not None for argument in (*args, *kwargs.values())):
            return self.eager_forward(*args, **kwargs)
        swapped = self.swapped_forwards()
        first = self.first_alike
        if first is not None and (first.block.training, first.swapped_forwards()) == (self.block.training, swapped):
            saved = [theirs[key] for theirs, _, key in self.tensor_places]
            try:
                for theirs, mine, key in self.tensor_places:
                    theirs[key] = mine[key]  # read now: FSDP2 swaps the block's parameters between calls
                return first(*args, **kwargs)
            finally:
                for (theirs, _, key), tensor in zip(self.tensor_places, saved):
                    theirs[key] = tensor
        compiled = self.compiled_by_swapped_forwards.get(swapped)
        if compiled is None:
            compiled = self.compiled_by_swapped_forwards[swapped] = self.thunder.jit(
                self.eager_forward, executors=thunder_executors()
            )
        return compiled(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> ThunderCompiledForward:
        # The compiled functions read the original block's tensors; a copied block compiles its own on first use.
        return ThunderCompiledForward(
            copy.deepcopy(self.block, memo), copy.deepcopy(self.eager_forward, memo), self.thunder
        )


# thunder's executor that fuses what no other executor claims, where thunder has no nvFuser of its own; None leaves
# thunder's defaults alone (the comparison in `benchmarks/bench.py --thunder_fusion none`).
THUNDER_FUSION_EXECUTOR: str | None = "torchcompile"


def thunder_executors() -> list[Any]:
    """The executors each thunder-compiled block runs with: thunder's defaults, then, where those do not include
    nvFuser, thunder's torch.compile executor for everything they leave.

    thunder 0.2.6's wheel comes without nvFuser: its defaults are SDPA and a cross-entropy kernel only, so every
    other operation of a block ran as a kernel of its own, and each result was kept for the backward (LoRA on
    llama-1b: half torch.compile's speed at 3.5x its memory). With the torch.compile executor a block's forward and
    its backward each become one inductor graph, the elementwise work fused between the library matmuls: 2x the
    speed at a third of the memory (benchmarks/NOTES.md, section 12)."""
    from thunder.extend import get_default_executors, get_executor

    executors = list(get_default_executors())
    names = {executor.name for executor in executors}
    if THUNDER_FUSION_EXECUTOR is not None and not names & {"nvfuser", THUNDER_FUSION_EXECUTOR}:
        executors.append(get_executor(THUNDER_FUSION_EXECUTOR))
    return executors


def import_thunder() -> ModuleType:
    """lightning-thunder's `thunder` package, or a ConfigError that says why it cannot be used here."""
    try:
        with warnings.catch_warnings():
            # thunder warns at import about each optional executor it does not find (transformer_engine, ...);
            # none is needed to compile a block, so the warnings would only alarm the user.
            warnings.simplefilter("ignore")
            import thunder
    except Exception as error:  # a release built against another torch fails with any error, not only ImportError
        message = str(error).strip()
        reason = f"{type(error).__name__}: {message.splitlines()[0]}" if message else type(error).__name__
        raise ConfigError(
            f"--compiler thunder: lightning-thunder is not importable here ({reason}); "
            "install lightning-thunder or use --compiler torch"
        ) from error
    return thunder


def quantized_base_error(what: str) -> ConfigError:
    return ConfigError(
        f"--compiler thunder cannot compile a quantized (bitsandbytes) base ({what}): thunder does not know "
        "litft's dequantizing matmul operator; use --compiler torch for QLoRA"
    )


@functools.cache  # once per process
def allow_grouped_query_attention() -> None:
    """Lets thunder trace `F.scaled_dot_product_attention(..., enable_gqa=...)`, which litft's attention passes.

    thunder 0.2.6 maps SDPA to its own operator, which lacks PyTorch 2.5's `enable_gqa`, so no block would trace.
    Where that is so, SDPA calls inside thunder-compiled code go to thunder's operator with each key and value
    head repeated for its group of query heads, which is what `enable_gqa` computes. Nothing changes outside
    thunder, nor under a thunder release whose operator takes `enable_gqa`."""
    import thunder.torch as thunder_torch
    from thunder.core import jit_ext

    thunder_attention = thunder_torch.scaled_dot_product_attention
    if "enable_gqa" in inspect.signature(thunder_attention.meta).parameters:
        return

    def attention_with_query_groups(
        query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False,
        *, scale: float | None = None, enable_gqa: bool = False,
    ) -> Any:
        query_heads, key_value_heads = query.shape[-3], key.shape[-3]
        if enable_gqa and query_heads != key_value_heads:
            group_size = query_heads // key_value_heads
            key = thunder_torch.repeat_interleave(key, group_size, dim=-3)
            value = thunder_torch.repeat_interleave(value, group_size, dim=-3)
        return thunder_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)

    # Wrapped as thunder wraps its own PyTorch-to-thunder lookasides (thunder.core.jit_ext).
    jit_ext._general_jit_lookaside_map[torch.nn.functional.scaled_dot_product_attention] = (
        jit_ext.ensure_recursive_proxies(
            jit_ext.interpreter_needs_wrap(jit_ext.record_source_loc_in_symbol_header(attention_with_query_groups))
        )
    )


@functools.cache  # once per process
def autocast_lora_updates() -> None:
    """Gives thunder's autocast (`--precision *-mixed`) a rule for `torch.addmm`, which LoRA's forward uses.

    Under torch.autocast PyTorch runs addmm in the low precision whatever its operands; thunder 0.2.6 has autocast
    rules for matmul, linear, convolutions and SDPA only, so the LoRA update would meet a bfloat16 base output and
    float32 factors and fail. The rule casts the three operands as PyTorch does."""
    import thunder.torch as thunder_torch
    from thunder.transforms import autocast

    addmm = thunder_torch._torch_to_thunder_function_map[torch.addmm]
    if addmm.id in autocast.autocast_impls:
        return

    # torch.addmm's own argument names, which a caller may pass by keyword.
    def addmm_in_low_precision(input: Any, mat1: Any, mat2: Any, *, beta: Any = 1, alpha: Any = 1, dtype: Any) -> Any:
        return addmm(*autocast.maybe_downcast_to(dtype, (input, mat1, mat2)), beta=beta, alpha=alpha)

    autocast.register_autocast_rule(addmm.id)(addmm_in_low_precision)
