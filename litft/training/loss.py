"""Cross-entropy over the vocabulary without materialising the float32 logits of the whole batch.

Only positions with a target (not -100) are projected at all. For a plain output head (an `nn.Linear`, frozen or
not) the projection, the loss and its gradients are computed chunk by chunk inside one autograd function, so at
most one chunk of logits (and its gradient) exists at any time; float32 values exist only inside the fused loss
kernel, never as a tensor. Heads that are not a plain
linear layer (a LoRA-adapted head, per-token log-probs for preference losses) run chunk by chunk under activation
checkpointing instead: the same memory bound, one extra head projection in the backward.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from litft.training import cross_entropy_kernel

IGNORE_INDEX = -100
# About 512 MiB of logits per chunk in the compute dtype, whatever the vocabulary size: large enough that the head
# projection runs as an efficient GEMM (2048 rows for a 128k vocabulary), small enough to stay a small transient.
CHUNK_BYTES = 512 * 1024**2


def chunk_size_for(vocab_size: int, element_size: int = 2) -> int:
    return max(64, CHUNK_BYTES // (element_size * vocab_size))


def cross_entropy_chunk(
    logits: torch.Tensor, targets: torch.Tensor, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i CE(softcap(logits_i), y_i) in float32 and its gradient with respect to `logits` (n, V), in the logits'
    dtype. Written as plain tensor code so that torch.compile turns it into two fused passes over the chunk (the
    log-normalizer reduction, then the gradient), instead of a float32 copy and a pass per operation."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        capped = torch.tanh(x / softcap)
        x = capped * softcap
    log_normalizer = torch.logsumexp(x, dim=-1, keepdim=True)  # (n, 1)
    target_logit = x.gather(1, targets[:, None])  # (n, 1)
    loss = (log_normalizer - target_logit).sum()
    # d(sum CE)/d logits = softmax - one_hot
    is_target = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]  # (n, V)
    grad = torch.exp(x - log_normalizer) - is_target.to(x.dtype)
    if softcap is not None:
        grad = grad * (1.0 - capped * capped)
    return loss, grad.to(logits.dtype)


_compiled_cross_entropy_chunk = None


def fused_cross_entropy_chunk(logits, targets, softcap):
    """`cross_entropy_chunk` on GPUs through litft's Triton kernel (`cross_entropy_kernel`), which writes the
    gradient over `logits`, or torch.compile's fusion of it where the kernel cannot run or
    `LITFT_CROSS_ENTROPY=compiled` asks for it (benchmarks); eager on CPU, where compiling would outweigh the gain."""
    if cross_entropy_kernel.can_run(logits) and os.environ.get("LITFT_CROSS_ENTROPY", "kernel") != "compiled":
        return cross_entropy_kernel.cross_entropy_in_place(logits, targets, softcap)
    global _compiled_cross_entropy_chunk
    if logits.device.type != "cuda":
        return cross_entropy_chunk(logits, targets, softcap)
    if _compiled_cross_entropy_chunk is None:
        _compiled_cross_entropy_chunk = torch.compile(cross_entropy_chunk, dynamic=True)
    return _compiled_cross_entropy_chunk(logits, targets, softcap)


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(softcap(h_i @ W^T), y_i), with the gradients for h and W computed during the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, softcap: float | None):  # type: ignore[override]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start : start + chunk_size]  # (n, D)
            y = targets[start : start + chunk_size]  # (n,)
            logits = h @ weight.t()  # (n, V) in the compute dtype, as the model's own head computes them
            loss, grad_logits = fused_cross_entropy_chunk(logits, y, softcap)
            del logits
            total += loss
            if grad_hidden is not None:
                # An assignment, not `out=`: under autocast (bf16-mixed) the product is bf16 and hidden float32.
                grad_hidden[start : start + chunk_size] = grad_logits @ weight
            if grad_weight is not None:
                # In-place ops skip autocast: under bf16-mixed the logits' gradient is bf16, the weight float32.
                grad_weight.addmm_(grad_logits.t().to(grad_weight.dtype), h.to(grad_weight.dtype))
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.to(grad_hidden.dtype if grad_hidden is not None else grad_weight.dtype)
        return (
            grad_hidden * scale if grad_hidden is not None else None,
            grad_weight * scale if grad_weight is not None else None,
            None,
            None,
            None,
        )


def _token_losses(hidden: torch.Tensor, targets: torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor]):
    logits = logits_fn(hidden).float()
    return F.cross_entropy(logits, targets, reduction="none")


def token_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int,
) -> torch.Tensor:
    """Per-position cross-entropy (N,) of flat hidden states (N, D), chunked and checkpointed."""
    losses = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            losses.append(checkpoint(_token_losses, h, y, logits_fn, use_reentrant=False))
        else:
            losses.append(_token_losses(h, y, logits_fn))
    return torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)


def find_trained_positions(targets: torch.Tensor) -> torch.Tensor:
    """The flat indices (N,) of the trained positions of `targets` (B, T). Found on the host while collating, they
    let the loss select those positions on the device without waiting for it (a boolean mask there would)."""
    return (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def causal_lm_loss(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    softcap: float | None = None,
    reduction: str = "sum",
    trained_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of already-shifted `targets` (B, T) (-100 = not trained) given final hidden states (B, T, D).

    reduction="sum": the summed loss over trained positions (float32 scalar); the caller divides by the trained-token
    count of the whole global batch. reduction="none": (B, T) per-position losses, 0 where not trained.
    `trained_positions`: the flat indices (N,) of the trained positions, as the objectives' `collate` finds them on
    the host; without them they are found here, on the device, and the host waits for it to learn N."""
    positions = find_trained_positions(targets) if trained_positions is None else trained_positions
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (N, D)
    flat_targets = targets.reshape(-1).index_select(0, positions)  # (N,)
    chunk_size = chunk_size_for(head.weight.shape[0] if hasattr(head, "weight") else 32000, hidden.element_size())
    if reduction == "sum" and type(head) is nn.Linear and head.bias is None:
        return _LinearCrossEntropySum.apply(flat_hidden, head.weight, flat_targets, chunk_size, softcap)
    losses = token_cross_entropy(flat_hidden, flat_targets, logits_fn, chunk_size)
    if reduction == "sum":
        return losses.sum()
    per_position = torch.zeros(targets.numel(), dtype=losses.dtype, device=losses.device)
    return per_position.index_copy(0, positions, losses).view(targets.shape)


def routers_of(model: nn.Module) -> list[nn.Module]:
    """The routers of `model`'s mixtures of experts, in layer order."""
    from litft.models.llama import Router

    return [module for module in model.modules() if isinstance(module, Router)]


@contextmanager
def router_choices(routers: list[nn.Module]) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Within the block, each of `routers` appends its (probabilities (N, E) float32, chosen experts (N, top_k)) to
    the yielded list, layer after layer (and tile after tile, each a run of the batch's tokens in order, under
    --train.mlp_tile_tokens)."""
    collected: list[tuple[torch.Tensor, torch.Tensor]] = []
    for router in routers:
        router.collected = collected
    try:
        yield collected
    finally:
        for router in routers:
            router.collected = None


def load_balancing_loss(
    collected: list[tuple[torch.Tensor, torch.Tensor]], token_mask: torch.Tensor
) -> torch.Tensor:
    """The routers' auxiliary load-balancing loss (Switch Transformer's, as transformers' `load_balancing_loss_func`
    computes it for Mixtral and Qwen-MoE): over every routed layer's real tokens (`token_mask` (B, T), padding
    False), num_experts * sum over slots and experts of (the fraction of tokens whose slot k went to expert e) x
    (expert e's mean router probability): top_k for an even router, up to top_k x num_experts for one that sends
    everything to the same experts. Sums per layer, so nothing of size tokens x top_k x experts is formed."""
    mask = token_mask.reshape(-1).to(torch.float32)  # (N,)
    tokens = mask.shape[0]
    probabilities, chosen = collected[0]
    experts, top_k = probabilities.shape[1], chosen.shape[1]
    routed = torch.zeros((top_k, experts), dtype=torch.float32, device=probabilities.device)
    probability_sum = torch.zeros(experts, dtype=torch.float32, device=probabilities.device)
    start = 0
    for probabilities, chosen in collected:
        rows = probabilities.shape[0]
        weight = mask[start : start + rows]  # this call's run of the batch's tokens
        start = (start + rows) % tokens
        routed = routed.scatter_add(1, chosen.t(), weight.expand(top_k, rows))  # (top_k, E)
        probability_sum = probability_sum + (probabilities * weight[:, None]).sum(dim=0)  # (E,)
    layers = sum(probabilities.shape[0] for probabilities, _ in collected) / tokens  # the routed layers
    counted = (mask.sum() * layers).clamp(min=1)  # real tokens over all routed layers
    return experts * ((routed / counted) * (probability_sum / counted)[None, :]).sum()


class CausalLMObjective(nn.Module):
    """Wraps a model so that its `forward` returns the loss: Fabric's DDP and FSDP2 wrappers hook `forward`, so the
    loss (and the head projection inside it) must run there, not in a side method.

    `router_aux_loss_coef` > 0 (a mixture of experts): the summed loss also carries that times the routers'
    load-balancing loss times the micro-batch's trained-token count, so that divided by the global batch's count
    it adds the coefficient times each micro-batch's balancing loss, weighted by its share of trained tokens (a
    single micro-batch: exactly transformers' loss with `output_router_logits`)."""

    def __init__(self, model: nn.Module, router_aux_loss_coef: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.router_aux_loss_coef = router_aux_loss_coef
        # Found once: a 48-layer mixture has tens of thousands of modules to walk (kept in a plain list, so the
        # routers are not registered twice).
        self.routers = routers_of(model) if router_aux_loss_coef else []
        # The last call's balancing loss times its trained tokens (detached), which the objective logs.
        self.router_aux_loss_sum: torch.Tensor | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        reduction: str = "sum",
        trained_positions: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        document_offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss (see `causal_lm_loss`); `token_mask` (B, T): the real tokens, padding False, which the routers'
        load-balancing loss counts (None: every position); `document_offsets`: packed rows' documents, as the
        collate function found them (see `CausalLM.hidden_states`)."""
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        if not self.router_aux_loss_coef:
            hidden = self.model.hidden_states(
                input_ids, position_ids=position_ids, document_ids=document_ids, document_offsets=document_offsets
            )
            return causal_lm_loss(
                hidden, targets, self.model.head, self.model.logits, softcap, reduction, trained_positions
            )
        if reduction != "sum":
            raise ValueError("the routers' load-balancing loss is added to the summed loss only")
        with router_choices(self.routers) as collected:
            hidden = self.model.hidden_states(
                input_ids, position_ids=position_ids, document_ids=document_ids, document_offsets=document_offsets
            )
        loss = causal_lm_loss(hidden, targets, self.model.head, self.model.logits, softcap, "sum", trained_positions)
        if not collected:  # no token reached a router (a model without mixtures is refused before training)
            return loss
        mask = torch.ones_like(input_ids, dtype=torch.bool) if token_mask is None else token_mask
        trained = (targets != IGNORE_INDEX).sum() if trained_positions is None else trained_positions.numel()
        balancing = load_balancing_loss(collected, mask) * trained
        self.router_aux_loss_sum = balancing.detach()
        return loss + self.router_aux_loss_coef * balancing
