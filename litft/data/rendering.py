"""Conversations to tokens with a training mask.

A conversation is rendered once with the chat template. Each assistant turn's characters are found by rendering
the conversation up to that turn: `render(messages[:i], add_generation_prompt=True)` ends where the answer starts
and `render(messages[:i + 1])` ends where it stops, end-of-turn token included. The full render is tokenized once
with character offsets, and a token is trained when its characters overlap an assistant turn. Masking by position
(never by token id) keeps the end-of-turn token trained even when it is also the padding token.

Whitespace the template puts after an end-of-turn token (ChatML's newline) is not trained: generation stops at the
end-of-turn token, so the model never has to produce it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from litft.data.formats import Message
from litft.errors import DataError, LitftError

IGNORE_INDEX = -100

# {"input_ids": LongTensor (L,), "targets": LongTensor (L,)}: targets[t] is the token that must follow input t,
# or IGNORE_INDEX where it is not trained.
Sample = dict[str, torch.Tensor]


@dataclass
class Tokenized:
    """One rendered sequence: its tokens and, for each, whether the model is trained to produce it."""

    tokens: list[int]
    trained: list[bool]

    @property
    def num_trained(self) -> int:
        # The first token is never predicted (nothing comes before it), so it never counts.
        return sum(self.trained[1:])


def assistant_spans(template: Any, messages: list[Message], location: str,
                    first_trained_message: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The full render and the character spans [start, end) of the assistant turns at or after
    `first_trained_message`."""
    text = _render(template, messages, False, location)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or index < first_trained_message:
            continue
        prefix = _render(template, messages[:index], True, location)
        through = _render(template, messages[: index + 1], False, location)
        if not (through.startswith(prefix) and text.startswith(through)):
            raise DataError(
                f"{location}: the chat template {template.name!r} renders earlier turns differently once later "
                f"turns follow, so the assistant turns cannot be located; pick another with --data.template"
            )
        end = len(through.rstrip())
        if end > len(prefix):
            spans.append((len(prefix), end))
    return text, spans


def tokenize_messages(tokenizer: Any, template: Any, messages: list[Message], train_on_prompt: bool,
                      location: str, first_trained_message: int = 0) -> Tokenized:
    """Renders and tokenizes a conversation; only assistant turns are trained unless `train_on_prompt`."""
    text, spans = assistant_spans(template, messages, location, first_trained_message)
    # The template may write the BOS text itself (Llama 3, Mistral); the tokenizer must not add a second one.
    starts_with_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    tokens, offsets = tokenizer.encode_with_offsets(text, add_bos=False if starts_with_bos else None)
    if train_on_prompt:
        trained = [True] * len(tokens)
    else:
        trained = _overlapping(offsets, spans)
    return Tokenized(list(tokens), trained)


def tokenize_text(tokenizer: Any, text: str) -> Tokenized:
    """Raw text for continued pre-training: BOS as the tokenizer does by default, EOS at the end, all trained."""
    tokens = tokenizer.encode(text, add_bos=None, add_eos=True)
    return Tokenized(list(tokens), [True] * len(tokens))


def fit_length(sequence: Tokenized, max_tokens: int, overlong: str, has_bos: bool) -> Tokenized | None:
    """`sequence` cut to at most `max_tokens` tokens, or None if it is too long and `overlong` is "drop".

    Truncation keeps the start of the first answer trainable: when the prompt alone fills the window, the start of
    the prompt is cut instead (keeping a leading BOS), so the window holds the end of the prompt and the start of
    the answer, half and half (or all of a shorter answer).
    """
    if len(sequence.tokens) <= max_tokens:
        return sequence
    if overlong == "drop":
        return None
    first_trained = next((i for i, trained in enumerate(sequence.trained) if i > 0 and trained), None)
    if first_trained is None or first_trained < max_tokens:
        return Tokenized(sequence.tokens[:max_tokens], sequence.trained[:max_tokens])
    keep_bos = 1 if has_bos else 0
    window = max_tokens - keep_bos
    # A short answer leaves more of the window to the prompt.
    start = max(keep_bos, min(first_trained - window // 2, len(sequence.tokens) - window))
    tokens = sequence.tokens[:keep_bos] + sequence.tokens[start : start + window]
    trained = sequence.trained[:keep_bos] + sequence.trained[start : start + window]
    return Tokenized(tokens, trained)


def split_windows(sequence: Tokenized, max_tokens: int) -> list[Tokenized]:
    """`sequence` as consecutive windows of at most `max_tokens` tokens (--data.overlong split, for text). Each
    window starts on the previous one's last token: a window's first token is only an input, so without the
    overlap every window boundary would lose a target."""
    if len(sequence.tokens) <= max_tokens:
        return [sequence]
    step = max_tokens - 1
    return [Tokenized(sequence.tokens[start : start + max_tokens], sequence.trained[start : start + max_tokens])
            for start in range(0, len(sequence.tokens) - 1, step)]


def to_sample(tokens: torch.Tensor, trained: torch.Tensor) -> Sample:
    """Shifts a rendered sequence (N,) into model inputs and targets (N - 1,)."""
    targets = torch.where(trained[1:], tokens[1:], torch.full_like(tokens[1:], IGNORE_INDEX))
    return {"input_ids": tokens[:-1], "targets": targets}


def _render(template: Any, messages: list[Message], add_generation_prompt: bool, location: str) -> str:
    try:
        return template.render(messages, add_generation_prompt=add_generation_prompt)
    except LitftError as error:  # e.g. the template's own `raise_exception` for roles that do not alternate
        raise DataError(f"{location}: {error}") from None


def _overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token's character span, whether it overlaps one of the sorted `spans` (one pass over both)."""
    overlapping = []
    span = 0
    for start, end in offsets:
        while span < len(spans) and spans[span][1] <= start:
            span += 1
        overlapping.append(span < len(spans) and start < spans[span][1] and end > spans[span][0])
    return overlapping
