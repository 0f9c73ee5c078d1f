"""Samples into rows, rows into batches.

A row is one line of a batch. Without packing it holds one sample; with packing several samples share a row of at
most `max_seq_length` tokens. Each sample in a packed row is its own document: position ids restart at 0, the
model's attention stays inside the document (`document_ids`), and since a sample's targets are already shifted,
no target ever predicts a token of the next document. The loss over a packed batch is therefore the sum of the
losses of its samples run alone.
"""

from __future__ import annotations

import bisect
import random

import torch

from litft.data.rendering import IGNORE_INDEX, Sample


def make_rows(samples: list[Sample], max_seq_length: int, pack: bool, seed: int) -> list[list[Sample]]:
    """Groups samples into rows. Without packing: one sample per row, in order. With packing: best-fit decreasing
    into rows of at most `max_seq_length` tokens, then the rows are shuffled with `seed` (so batches do not run from
    the longest rows to the shortest); the same samples and seed always give the same rows."""
    if not pack:
        return [[sample] for sample in samples]
    lengths = [len(sample["input_ids"]) for sample in samples]
    too_long = [length for length in lengths if length > max_seq_length]
    if too_long:
        raise ValueError(f"a sample of {max(too_long)} tokens does not fit max_seq_length={max_seq_length}")
    # Longest first; each goes to the fullest row it still fits in. `free` is sorted (free tokens, row index).
    order = sorted(range(len(samples)), key=lambda index: (-lengths[index], index))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for index in order:
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot == len(free):
            row = len(rows)
            rows.append([])
            room = max_seq_length
        else:
            room, row = free.pop(slot)
        rows[row].append(index)
        bisect.insort(free, (room - lengths[index], row))
    random.Random(seed).shuffle(rows)
    return [[samples[index] for index in sorted(row)] for row in rows]


def collate(rows: list[list[Sample]], pad_id: int = 0, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor | None]:
    """Pads rows to the longest in the batch (rounded up to `pad_to_multiple_of`).

    Returns `input_ids` (B, T), `targets` (B, T) with IGNORE_INDEX on padding, `position_ids` (B, T) restarting at 0
    for each document, and `document_ids` (B, T) numbering the documents of a row 1, 2, ... with 0 on padding, or
    None when every row holds one sample (right padding comes after the real tokens and is never a target, so the
    causal mask alone is enough).
    """
    row_lengths = [sum(len(sample["input_ids"]) for sample in row) for row in rows]
    length = max(row_lengths)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch_size = len(rows)
    input_ids = torch.full((batch_size, length), pad_id, dtype=torch.long)
    targets = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
    # Padding positions simply keep counting; they are never attended to by real tokens nor trained.
    position_ids = torch.arange(length).repeat(batch_size, 1)
    packed = any(len(row) > 1 for row in rows)
    document_ids = torch.zeros((batch_size, length), dtype=torch.long) if packed else None
    for b, row in enumerate(rows):
        start = 0
        for document, sample in enumerate(row, start=1):
            end = start + len(sample["input_ids"])
            input_ids[b, start:end] = sample["input_ids"]
            targets[b, start:end] = sample["targets"]
            position_ids[b, start:end] = torch.arange(end - start)
            if document_ids is not None:
                document_ids[b, start:end] = document
            start = end
    return {"input_ids": input_ids, "targets": targets, "position_ids": position_ids, "document_ids": document_ids}
