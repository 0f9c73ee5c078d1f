"""Autoregressive generation with a KV cache: one prefill over the (left-padded) prompts, then one token per step.

Left padding keeps every prompt's last token in the same column, so each step appends one column for the whole
batch. Padding is masked through `document_ids` (0 = padding, 1 = real tokens, so real tokens never attend to it)
and positions count from each prompt's first real token, which makes a padded row compute exactly what it would
compute alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GenerationResult:
    token_ids: list[int]  # the new tokens, without the stop token that ended them
    finish_reason: str  # "eos": a stop token was produced; "length": max_new_tokens was reached


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Picks the next token of each row from logits (B, vocab): argmax at temperature 0, else a sample from the
    temperature-scaled distribution restricted to the top_k most likely tokens and the top_p nucleus."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens ranked above it already reach top_p; the most likely token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probabilities = logits.softmax(dim=-1)
    return torch.multinomial(probabilities, num_samples=1, generator=generator).squeeze(-1)


def _left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """input_ids, position_ids (B, P) and document_ids (B, P), the last None when no prompt needs padding."""
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    document_ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        start = longest - len(prompt)
        input_ids[row, start:] = torch.tensor(prompt, dtype=torch.long)
        position_ids[row, start:] = torch.arange(len(prompt))
        document_ids[row, start:] = 1
    padded = any(len(p) < longest for p in prompts)
    return (
        input_ids.to(device),
        position_ids.to(device),
        document_ids.to(device) if padded else None,
    )


def _model_device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    weight = model.embeddings.weight
    return weight.device, weight.dtype if weight.is_floating_point() else torch.float32


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    on_token: Callable[[int, int], None] | None = None,
) -> list[GenerationResult]:
    """Continues every prompt by up to `max_new_tokens` tokens, stopping a row at its first id in `stop_ids`.

    `on_token(batch_index, token_id)` is called for each new token as it is produced (not for stop tokens)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    device, dtype = _model_device_and_dtype(model)
    batch_size = len(prompts)
    input_ids, position_ids, document_ids = _left_pad(prompts, pad_id, device)
    results = [GenerationResult([], "length") for _ in prompts]
    if max_new_tokens <= 0:
        return results
    kv_cache = model.make_kv_cache(batch_size, input_ids.shape[1] + max_new_tokens, device, dtype)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    step_documents = torch.ones(batch_size, 1, dtype=torch.long, device=device) if document_ids is not None else None

    hidden = model.hidden_states(input_ids, position_ids, document_ids, kv_cache)  # (B, P, hidden)
    next_positions = position_ids[:, -1:] + 1  # (B, 1)
    for step in range(max_new_tokens):
        logits = model.logits(hidden[:, -1])  # (B, vocab)
        tokens = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        is_stop = torch.isin(tokens, stop) & ~finished
        for row, (token, stopped, done) in enumerate(zip(tokens.tolist(), is_stop.tolist(), finished.tolist())):
            if done:
                continue
            if stopped:
                results[row].finish_reason = "eos"
                continue
            results[row].token_ids.append(token)
            if on_token is not None:
                on_token(row, token)
        finished |= is_stop
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        # Finished rows keep stepping (their output is ignored) so the batch stays one rectangle.
        hidden = model.hidden_states(tokens[:, None], next_positions, step_documents, kv_cache)  # (B, 1, hidden)
        next_positions = next_positions + 1
    return results
