"""Before training: how much device memory a run will take and how fast it will go, from the model's shape alone.

Used by `--dry_run` (print the estimate, train nothing) and `--train.micro_batch_size auto` (the largest
micro-batch whose estimate fits in 90% of the device). Two activation models, for compiled and for eager LoRA
blocks, each checked against what a block saves for its backward (tests/test_finetune.py) and within 3% of
`max_memory_allocated` on an H200 (Llama-3.2-1B and Llama-3.1-8B geometry, compiled). Treat the numbers as
estimates, not promises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from litft.training.loss import CHUNK_BYTES as LOSS_CHUNK_BYTES
from litft.training.strategies import (
    KEPT_OUTPUT_WIDENING,
    ModelMemory,
    checkpointed_block_count,
    host_memory_bytes,
    kept_bytes_per_block,
)

GIB = 1024**3
# What litft's compiled LoRA step reached on an H200 (72% of 790 TFLOP/s measured bf16 matrix throughput), rounded
# down: the estimate should not promise more than a typical run delivers.
ASSUMED_MFU = 0.6
# Dense bf16 tensor throughput per device, by name fragment (vendor figures; the H100/H200 one is what a bf16
# matrix product measured on the H200 machines this project benchmarks on).
PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "4090": 165.0}
# One chunk of logits and its gradient, in the compute dtype. On GPUs the gradient is written over the logits
# (cross_entropy_kernel) and the measured peaks fell by one chunk (0.5 GiB), yet two chunks still put the estimate
# within 1% of them (llama-1b 16.52 against 16.47 GiB, llama-8b 39.65 against 40.03): the model's other terms run
# that much low, so the second chunk stays until they are refined.
FUSED_LOSS_CHUNK_BYTES = 2 * LOSS_CHUNK_BYTES
MEMORY_FRACTION = 0.9  # the share of the device a run may fill (estimated or probed); the rest is the margin


@dataclass
class RunEstimate:
    weights_gib: float
    training_state_gib: float  # gradients and optimizer state of the trained parameters
    activations_gib: float
    loss_gib: float
    flops_per_token: float
    tokens_per_second: float | None  # None where the device's throughput is unknown (CPU)

    @property
    def peak_gib(self) -> float:
        return self.weights_gib + self.training_state_gib + self.activations_gib + self.loss_gib

    def describe(self, micro_batch_size: int, seq_len: int) -> str:
        speed = f"about {self.tokens_per_second:,.0f} tokens/s per device" if self.tokens_per_second else (
            "tokens/s unknown on this device"
        )
        return (
            f"estimate for micro-batch {micro_batch_size} x {seq_len} tokens: peak memory about {self.peak_gib:.1f} GiB "
            f"per device (weights {self.weights_gib:.1f}, gradients + optimizer {self.training_state_gib:.1f}, "
            f"activations {self.activations_gib:.1f}, loss {self.loss_gib:.1f}); {speed}"
        )


@dataclass(frozen=True)
class Widths:
    """A decoder's widths from its Hugging Face config, with the defaults the families use where a key is absent."""

    hidden: int
    intermediate: int  # what one token's MLP computes: for a mixture of experts, its chosen experts' widths summed
    heads: int
    kv_heads: int
    head_dim: int
    experts_per_token: int = 0  # 0: a dense MLP

    @classmethod
    def of(cls, hf_config: dict[str, Any]) -> Widths:
        hidden, heads = hf_config["hidden_size"], hf_config["num_attention_heads"]
        intermediate = hf_config.get("intermediate_size") or 4 * hidden
        experts_per_token = 0
        if hf_config.get("num_local_experts") or hf_config.get("num_experts"):
            experts_per_token = hf_config.get("num_experts_per_tok") or 0
            expert_width = hf_config.get("moe_intermediate_size") or intermediate
            intermediate = experts_per_token * expert_width + (hf_config.get("shared_expert_intermediate_size") or 0)
        return cls(hidden=hidden, intermediate=intermediate, heads=heads,
                   kv_heads=hf_config.get("num_key_value_heads") or heads,
                   head_dim=hf_config.get("head_dim") or hidden // heads, experts_per_token=experts_per_token)


def intermediate_tensors(compiled: bool, lora: bool = True) -> int:
    """How many intermediate-size tensors a block keeps per token: gate and up. A full fine-tune run eagerly also
    keeps SwiGLU's activation and product; compiled blocks recompute those two, and LoRA's down operator
    (`litft.adapters.lora_gated_down`) forms them again inside its backward kernel."""
    return 2 if compiled or lora else 4


def activation_bytes_per_token_per_layer(
    hf_config: dict[str, Any], element_size: int, compiled: bool = False, lora: bool = True
) -> int:
    """What autograd keeps per token and decoder layer of a LoRA model (counted with saved-tensor hooks,
    tests/test_finetune.py). Compiled (litft's partitioner settings, which recompute the norms and SwiGLU's
    product): the block input, q, k and v, the attention output, the residual between attention and MLP, gate and
    up. Eager: the norms' outputs too, about 8.5 hidden-size, 2 key/value-size and 2 intermediate-size tensors (4
    for a full fine-tune, whose down projection keeps SwiGLU's activation and product). A mixture of experts also
    keeps, per chosen expert, about four hidden-size tensors: the token's copy, the expert's output, the outputs
    gathered back into token order, and what its grouped GEMMs keep of them."""
    widths = Widths.of(hf_config)
    kv_width = widths.kv_heads * widths.head_dim
    hidden_sized = 3 * widths.hidden + widths.heads * widths.head_dim if compiled else 17 * widths.hidden // 2
    hidden_sized += 4 * widths.experts_per_token * widths.hidden
    return element_size * (hidden_sized + 2 * kv_width + intermediate_tensors(compiled, lora) * widths.intermediate)


def parameter_count(hf_config: dict[str, Any]) -> int:
    """Parameters of the decoder (attention and MLP matrices) plus embeddings, from the config. For a mixture of
    experts, those one token computes with (its chosen experts): what sets the work per token."""
    widths = Widths.of(hf_config)
    attention = widths.hidden * widths.head_dim * (2 * widths.heads + 2 * widths.kv_heads)
    mlp = 3 * widths.hidden * widths.intermediate
    embeddings = hf_config["vocab_size"] * widths.hidden * (1 if hf_config.get("tie_word_embeddings") else 2)
    return hf_config["num_hidden_layers"] * (attention + mlp) + embeddings


def kept_projections(hf_config: dict[str, Any]) -> tuple[int, float]:
    """Under offloaded checkpointing, the projections whose outputs a block keeps for its recomputation
    (`KEPT_OUTPUT_WIDENING`): (their output columns per token, their share of the block's base-GEMM work)."""
    widths = Widths.of(hf_config)
    q_width, kv_width = widths.heads * widths.head_dim, widths.kv_heads * widths.head_dim
    groups = [  # (in, out) of q/k/v, o, gate/up and down
        (widths.hidden, q_width + 2 * kv_width), (q_width, widths.hidden),
        (widths.hidden, 2 * widths.intermediate), (widths.intermediate, widths.hidden),
    ]
    kept = [(in_width, out_width) for in_width, out_width in groups if out_width <= KEPT_OUTPUT_WIDENING * in_width]
    work = sum(in_width * out_width for in_width, out_width in groups)
    return sum(out_width for _, out_width in kept), sum(i * o for i, o in kept) / work


def device_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((tflops for fragment, tflops in PEAK_TFLOPS.items() if fragment in name), None)


def estimate_run(
    hf_config: dict[str, Any],
    memory: ModelMemory,
    method: str,
    dtype: torch.dtype,
    micro_batch_size: int,
    seq_len: int,
    activation_checkpointing: bool | str,
    checkpointed_blocks: int | None = None,
    mlp_tile_tokens: int | None = None,
    compiled: bool = False,
) -> RunEstimate:
    element_size = torch.empty((), dtype=dtype).element_size()
    tokens = micro_batch_size * seq_len
    layers = hf_config["num_hidden_layers"]
    lora = method != "full"
    per_layer = activation_bytes_per_token_per_layer(hf_config, element_size, compiled, lora)
    mlp_tile_bytes = 0
    if mlp_tile_tokens is not None and tokens > mlp_tile_tokens:
        # A tiled MLP keeps no intermediate-size tensor per token; one tile's (and its gradients) exist at a time.
        intermediate_bytes = intermediate_tensors(compiled, lora) * Widths.of(hf_config).intermediate * element_size
        per_layer -= intermediate_bytes
        mlp_tile_bytes = 2 * intermediate_bytes * mlp_tile_tokens
    checkpointed = checkpointed_block_count(layers, checkpointed_blocks) if activation_checkpointing else 0
    kept_columns, kept_work = kept_projections(hf_config) if activation_checkpointing == "offload" else (0, 0.0)
    if checkpointed:
        # A checkpointed block keeps only its input; one block's full activations exist during its recomputation.
        # Offloaded, the inputs wait in host memory, and the next block's kept outputs arrive meanwhile (up to
        # their share of the device; past it a block keeps fewer of them and recomputes more).
        input_bytes = 0 if activation_checkpointing == "offload" else hf_config["hidden_size"] * element_size
        kept_bytes = tokens * kept_columns * element_size
        arriving = min(kept_bytes, kept_bytes_per_block())  # the runtime's own cap
        kept_work *= arriving / kept_bytes if kept_bytes else 0.0
        activations = tokens * (checkpointed * input_bytes + (layers - checkpointed) * per_layer + per_layer)
        activations += arriving
    else:
        activations = tokens * layers * per_layer
    activations += mlp_tile_bytes
    loss = FUSED_LOSS_CHUNK_BYTES + tokens * hf_config["hidden_size"] * element_size
    parameters = parameter_count(hf_config)
    attention_flops = 4 * layers * seq_len * hf_config["hidden_size"]
    # Forward 2N; backward 2N for the input gradient (+2N for weight gradients when every weight trains);
    # recomputation adds another forward, less the projections whose outputs were kept.
    multiplier = (6 if method == "full" else 4) + 2 * checkpointed / layers * (1 - kept_work)
    flops_per_token = multiplier * parameters + (3 + checkpointed / layers) * attention_flops
    peak = device_peak_tflops()
    speed = peak * 1e12 * ASSUMED_MFU / flops_per_token if peak else None
    return RunEstimate(
        weights_gib=memory.weight_bytes / GIB,
        training_state_gib=(memory.unsharded_bytes - memory.weight_bytes) / GIB,
        activations_gib=activations / GIB,
        loss_gib=loss / GIB,
        flops_per_token=flops_per_token,
        tokens_per_second=speed,
    )


def available_device_bytes() -> int:
    """The memory a run may fill: the GPU's total, or the host's physical memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return host_memory_bytes()


def micro_batch_candidates(per_device_rows: int) -> list[int]:
    """The micro-batch sizes a device can use: the divisors of the rows it gets per optimizer step, ascending."""
    if per_device_rows < 1:
        raise ValueError(f"per_device_rows must be at least 1, got {per_device_rows}")
    return [size for size in range(1, per_device_rows + 1) if per_device_rows % size == 0]


def largest_micro_batch(
    estimate_for: Any, per_device_rows: int, device_bytes: int, fraction: float = MEMORY_FRACTION
) -> int:
    """The largest micro-batch that divides the rows each device gets per step and whose estimated peak fits in
    `fraction` of the device (at least 1). `estimate_for(micro_batch_size)` returns a RunEstimate."""
    best = 1
    for candidate in micro_batch_candidates(per_device_rows):
        if estimate_for(candidate).peak_gib * GIB > fraction * device_bytes:
            break
        best = candidate
    return best
