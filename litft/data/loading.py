"""Dataset files to samples: read, convert, render, tokenize, fit the length, cache, split.

Records stream from the files in chunks; each chunk is tokenized in the main process or, with
`--data.num_workers N`, in one of N forked worker processes (a bounded number of chunks is in flight, so a large
JSONL file never sits in memory whole). The result is cached (`litft.data.cache`); a second run with the same
files, tokenizer and settings reads the cache instead.
"""

from __future__ import annotations

import itertools
import multiprocessing
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from litft.data.cache import TokenizedDataset, cache_key, default_cache_dir, load_cached, save_cached
from litft.data.config import DataConfig
from litft.data.files import Record, data_files, iter_records
from litft.data.formats import (
    FieldNames,
    detect_format,
    record_to_messages,
    record_to_preference,
    record_to_text,
)
from litft.data.rendering import (
    Sample,
    Tokenized,
    fit_length,
    split_windows,
    to_sample,
    tokenize_messages,
    tokenize_text,
)
from litft.errors import DataError

PreferenceSample = dict[str, Sample]  # {"chosen": Sample, "rejected": Sample}
Log = Callable[[str], None]

RECORDS_PER_CHUNK = 256
# "unanswered": conversations whose last turn is not the assistant's (its tokens are read, never trained).
COUNT_NAMES = ("records", "truncated", "split", "dropped_overlong", "dropped_untrained", "unanswered")


@dataclass
class TokenizeJob:
    """Everything a worker needs to tokenize records; set once before the workers fork."""

    tokenizer: Any
    template: Any
    format: str
    fields: FieldNames
    train_on_prompt: bool
    max_tokens: int  # max_seq_length + 1: the inputs and the shifted targets are one token shorter
    overlong: str


# The job of the current tokenization, inherited by forked workers (so neither tokenizer nor template is pickled).
_JOB: TokenizeJob | None = None


def load_datasets(config: DataConfig, tokenizer: Any, chat_template: Any,
                  log: Log = print) -> tuple[list[Sample], list[Sample] | None]:
    """Train and validation samples (validation is None without `val_split` / `val_path`)."""
    train, validation = _load(config, tokenizer, chat_template, preference=False, log=log)
    return to_samples(train), to_samples(validation) if validation is not None else None


def load_preference_datasets(config: DataConfig, tokenizer: Any, chat_template: Any,
                             log: Log = print) -> tuple[list[PreferenceSample], list[PreferenceSample] | None]:
    """Train and validation pairs: chosen and rejected rendered with the same template, prompt tokens masked."""
    train, validation = _load(config, tokenizer, chat_template, preference=True, log=log)
    return _pairs(train), _pairs(validation) if validation is not None else None


def _load(config: DataConfig, tokenizer: Any, chat_template: Any, preference: bool,
          log: Log) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    config.validate()
    train_files, validation_files = dataset_files(config, log)
    train = tokenize_dataset(config.path, "--data.path", config, tokenizer, chat_template, preference, log,
                             files=train_files)
    if config.val_path:
        validation = tokenize_dataset(config.val_path, "--data.val_path", config, tokenizer, chat_template,
                                      preference, log, files=validation_files)
        return train, validation
    if not config.val_split:
        return train, None
    group = 2 if preference else 1
    train, validation = split_dataset(train, config.val_split, config.seed, group)
    log(f"data: held out {len(validation) // group} of {(len(train) + len(validation)) // group} samples for "
        f"validation (--data.val_split {config.val_split}, --data.seed {config.seed})")
    return train, validation


def dataset_files(config: DataConfig, log: Log = print) -> tuple[list[Path], list[Path]]:
    """The training and the validation files. The validation files are found first, so that a wrong
    --data.val_path fails before the training set is tokenized, and those inside the training folder are left out
    of training (a validation loss over trained-on samples would mislead)."""
    validation_files = data_files(config.val_path, "--data.val_path") if config.val_path else []
    train_files = data_files(config.path, "--data.path", exclude=validation_files)
    if {file.resolve() for file in train_files} & {file.resolve() for file in validation_files}:
        raise DataError(f"--data.val_path {config.val_path}: these are the training files of --data.path "
                        f"{config.path}; give a separate validation file, or use --data.val_split instead")
    folder = Path(config.path).expanduser().resolve()
    inside = sum(folder in file.resolve().parents for file in validation_files)
    if inside:
        log(f"data: {config.path}: leaving out {inside} file(s) of --data.val_path {config.val_path}, which lie in "
            "the training folder")
    return train_files, validation_files


def tokenize_dataset(path: str, flag: str, config: DataConfig, tokenizer: Any, chat_template: Any,
                     preference: bool, log: Log = print, files: list[Path] | None = None) -> TokenizedDataset:
    """The tokenized sequences of the files at `path` (or of `files`, those of them to read), for preference data:
    chosen, rejected, chosen, ..., from the cache when it holds them. Raises DataError for the first bad record,
    writing nothing."""
    files = data_files(path, flag) if files is None else files
    settings = {
        "format": config.format, "fields": config.fields, "template": chat_template.name if chat_template else None,
        "train_on_prompt": config.train_on_prompt, "max_seq_length": config.max_seq_length,
        "overlong": config.overlong, "limit": config.limit, "preference": preference,
    }
    template_source = getattr(chat_template, "source", "") or ""
    cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    cache_file = cache_dir / f"{cache_key(files, tokenizer, template_source, settings)}.safetensors"
    dataset = load_cached(cache_file)
    from_cache = dataset is not None
    if from_cache:
        log(f"data: {path}: reusing the tokenized cache {cache_file}")
    else:
        dataset = _tokenize_files(files, path, config, tokenizer, chat_template, preference, log)
    _log_counts(dataset, path, config, preference, log)
    if len(dataset) == 0:
        raise DataError(
            f"{path}: no sample has a trained token left (of {dataset.counts['records']} records, "
            f"{dataset.counts['dropped_overlong']} were longer than --data.max_seq_length {config.max_seq_length} "
            f"and {dataset.counts['dropped_untrained']} had nothing to train); raise --data.max_seq_length or check "
            "the data"
        )
    if not from_cache:
        try:
            save_cached(cache_file, dataset)
        except OSError as error:  # the cache only saves time: without a flag naming the folder, go on without it
            reason = error.strerror or str(error)
            if config.cache_dir:
                raise DataError(f"--data.cache_dir {config.cache_dir}: cannot write the tokenized cache there "
                                f"({reason}); give a writable folder") from None
            log(f"data: cannot write the tokenized cache to {cache_dir} ({reason}); going on without it (set "
                "--data.cache_dir or LITFT_CACHE_DIR to a writable folder)")
    return dataset


def _tokenize_files(files: list[Path], path: str, config: DataConfig, tokenizer: Any, chat_template: Any,
                    preference: bool, log: Log) -> TokenizedDataset:
    global _JOB
    fields = FieldNames(config.fields)
    records = iter_records(files)
    if config.limit is not None:
        records = itertools.islice(records, config.limit)
    first = next(records, None)
    if first is None:
        raise DataError(f"{path}: the dataset holds no records")
    if preference and config.format not in ("auto", "preference"):
        raise DataError(f"--data.format {config.format}: preference training needs the preference format "
                        "(prompt, chosen, rejected)")
    # Preference training reads only preference records; a record without `chosen` then names that field.
    data_format = "preference" if preference else _resolve_format(first, fields, config, path, log)
    if not preference and data_format == "preference":
        raise DataError(f"{path}: preference data (chosen/rejected) is for `litft finetune dpo|orpo|simpo`; "
                        "supervised fine-tuning needs a chat, instruction or text dataset")
    if config.overlong == "split" and data_format != "text":
        raise DataError(f"--data.overlong split: cuts text documents into windows; {path} is {data_format!r} data, "
                        "whose samples it would cut from their prompts; use truncate or drop")
    if data_format != "text" and chat_template is None:
        raise DataError(f"{path}: the {data_format!r} format needs a chat template; pass --data.template")
    _JOB = TokenizeJob(tokenizer, chat_template, data_format, fields, config.train_on_prompt,
                       config.max_seq_length + 1, config.overlong)
    try:
        chunks = _chunks(itertools.chain([first], records), RECORDS_PER_CHUNK)
        results = _map_in_order(_tokenize_chunk, chunks, config.num_workers)
        token_parts, trained_parts, length_parts = [], [], []
        counts = dict.fromkeys(COUNT_NAMES, 0)
        for tokens, trained, lengths, chunk_counts in results:
            token_parts.append(tokens)
            trained_parts.append(trained)
            length_parts.append(lengths)
            for name in COUNT_NAMES:
                counts[name] += chunk_counts[name]
    finally:
        _JOB = None
    lengths = np.concatenate(length_parts)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenizedDataset(np.concatenate(token_parts), np.concatenate(trained_parts), offsets, counts, data_format)


def detect_dataset_format(path: str, config: DataConfig, files: list[Path] | None = None) -> str:
    """The format `--data.format` names, or the one the first record of the files at `path` (or of `files`) has."""
    if config.format != "auto":
        return config.format
    first = next(iter_records(data_files(path) if files is None else files), None)
    if first is None:
        raise DataError(f"{path}: the dataset holds no records")
    return _resolve_format(first, FieldNames(config.fields), config, path, log=lambda line: None)


def _resolve_format(first: tuple[str, Record], fields: FieldNames, config: DataConfig, path: str, log: Log) -> str:
    if config.format != "auto":
        return config.format
    location, record = first
    data_format = detect_format(record, fields, location)
    log(f"data: {path}: detected the {data_format!r} format from the fields of the first record, {location} "
        f"({', '.join(sorted(record))}); set --data.format to override")
    return data_format


def _chunks(records: Iterator[tuple[str, Record]], size: int) -> Iterator[list[tuple[str, Record]]]:
    while chunk := list(itertools.islice(records, size)):
        yield chunk


def _map_in_order(function: Callable, chunks: Iterator, num_workers: int) -> Iterator:
    """`map(function, chunks)`, across forked workers when there are several, with at most two chunks per worker
    read ahead so memory stays bounded."""
    if num_workers == 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield from map(function, chunks)
        return
    with multiprocessing.get_context("fork").Pool(num_workers) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(function, (chunk,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _tokenize_chunk(chunk: list[tuple[str, Record]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """Tokenizes records into flat arrays: tokens, trained flags, and the length of each kept sequence."""
    job = _JOB
    assert job is not None, "the tokenize job is set before any chunk is tokenized"
    tokens: list[int] = []
    trained: list[bool] = []
    lengths: list[int] = []
    counts = dict.fromkeys(COUNT_NAMES, 0)
    for location, record in chunk:
        counts["records"] += 1
        sequences, unanswered = _tokenize_record(job, location, record)
        if job.overlong == "split":
            fitted = [window for sequence in sequences for window in split_windows(sequence, job.max_tokens)]
            counts["split"] += len(fitted) > len(sequences)
            sequences = fitted  # windows, not truncations: the truncation count below stays 0
        else:
            fitted = [fit_length(s, job.max_tokens, job.overlong, _starts_with_bos(job, s)) for s in sequences]
        if any(sequence is None for sequence in fitted):
            counts["dropped_overlong"] += 1
            continue
        if any(sequence.num_trained == 0 for sequence in fitted):
            counts["dropped_untrained"] += 1
            continue
        if any(len(new.tokens) < len(old.tokens) for new, old in zip(fitted, sequences)):
            counts["truncated"] += 1
        counts["unanswered"] += unanswered
        for sequence in fitted:
            tokens += sequence.tokens
            trained += sequence.trained
            lengths.append(len(sequence.tokens))
    return (np.asarray(tokens, dtype=np.int32), np.asarray(trained, dtype=np.bool_),
            np.asarray(lengths, dtype=np.int64), counts)


def _tokenize_record(job: TokenizeJob, location: str, record: Record) -> tuple[list[Tokenized], bool]:
    """The sequences of one record: one, or (chosen, rejected) for preference data; and whether it is a conversation
    that ends on a turn other than the assistant's (read, never trained, unless --data.train_on_prompt)."""
    if job.format == "text":
        return [tokenize_text(job.tokenizer, record_to_text(record, job.fields, location))], False
    if job.format != "preference":
        messages = record_to_messages(record, job.format, job.fields, location)
        unanswered = messages[-1]["role"] != "assistant" and not job.train_on_prompt
        return [tokenize_messages(job.tokenizer, job.template, messages, job.train_on_prompt, location)], unanswered
    pair = record_to_preference(record, job.fields, location)
    sequences = [
        tokenize_messages(job.tokenizer, job.template, pair.prompt + answer, False, location,
                          first_trained_message=len(pair.prompt))
        for answer in (pair.chosen, pair.rejected)
    ]
    prompt_length = sequences[0].trained.index(True) if any(sequences[0].trained) else len(sequences[0].tokens)
    if prompt_length >= job.max_tokens - 1 and job.overlong == "truncate":
        raise DataError(f"{location}: the prompt is {prompt_length} tokens, longer than --data.max_seq_length "
                        f"{job.max_tokens - 1}; raise it, or skip such pairs with --data.overlong drop")
    return sequences, False


def _starts_with_bos(job: TokenizeJob, sequence: Tokenized) -> bool:
    return bool(sequence.tokens) and sequence.tokens[0] == job.tokenizer.bos_id


def _log_counts(dataset: TokenizedDataset, path: str, config: DataConfig, preference: bool, log: Log) -> None:
    counts = dataset.counts
    kind = "pairs" if preference else "samples"
    kept = len(dataset) // 2 if preference else len(dataset)
    # A sequence's first token is never a target.
    trained = int(dataset.trained.sum() - dataset.trained[dataset.offsets[:-1]].sum())
    split = f"{counts['split']} split into windows, " if counts.get("split") else ""
    log(f"data: {path}: {kept} {kind} from {counts['records']} records ({dataset.format}), "
        f"{len(dataset.tokens)} tokens, {trained} trained; {counts['truncated']} truncated, {split}"
        f"{counts['dropped_overlong']} dropped as longer than --data.max_seq_length {config.max_seq_length} "
        f"(--data.overlong {config.overlong}), {counts['dropped_untrained']} dropped with nothing to train")
    if not preference and len(dataset):
        # One trained token is the end of turn alone: an empty answer, which teaches the model to answer nothing.
        per_sequence = np.add.reduceat(dataset.trained.astype(np.int64), dataset.offsets[:-1].astype(np.int64))
        per_sequence -= dataset.trained[dataset.offsets[:-1]].astype(np.int64)
        empty = np.flatnonzero(per_sequence == 1)
        if len(empty):
            log(f"warning: {path}: {len(empty)} of {len(dataset)} samples train only their end-of-turn token (an "
                f"empty answer?), the first is sample {int(empty[0]) + 1}; `litft data preview` shows them")
    if counts.get("unanswered"):  # caches written before this count have none
        log(f"note: {path}: {counts['unanswered']} of {counts['records']} conversations end on a turn other than "
            f"the assistant's: no trained token follows that turn, so it teaches nothing (drop it from the data to "
            f"save its compute, or train on prompts with --data.train_on_prompt true)")


def split_dataset(dataset: TokenizedDataset, fraction: float, seed: int,
                  group: int = 1) -> tuple[TokenizedDataset, TokenizedDataset]:
    """A reproducible random split: `fraction` of the samples (groups of `group` sequences, e.g. preference
    pairs) go to the second part, at least one, and at least one stays in the first."""
    num_samples = len(dataset) // group
    num_validation = max(1, round(num_samples * fraction))
    if num_validation >= num_samples:
        raise DataError(f"--data.val_split {fraction}: the dataset has only {num_samples} samples, too few to split")
    order = list(range(num_samples))
    random.Random(seed).shuffle(order)
    validation = sorted(order[:num_validation])
    train = sorted(order[num_validation:])
    return _select(dataset, train, group), _select(dataset, validation, group)


def _select(dataset: TokenizedDataset, samples: list[int], group: int) -> TokenizedDataset:
    sequences = [sample * group + member for sample in samples for member in range(group)]
    starts, ends = dataset.offsets[:-1][sequences], dataset.offsets[1:][sequences]
    pieces = [slice(start, end) for start, end in zip(starts, ends)]
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(ends - starts, out=offsets[1:])
    return TokenizedDataset(
        np.concatenate([dataset.tokens[piece] for piece in pieces]),
        np.concatenate([dataset.trained[piece] for piece in pieces]),
        offsets, dataset.counts, dataset.format,
    )


def to_samples(dataset: TokenizedDataset) -> list[Sample]:
    """One sample per sequence; the inputs are views into one shared tensor of tokens."""
    tokens = torch.from_numpy(dataset.tokens.astype(np.int64))
    trained = torch.from_numpy(dataset.trained.copy())
    offsets = dataset.offsets.tolist()
    return [to_sample(tokens[start:end], trained[start:end]) for start, end in zip(offsets[:-1], offsets[1:])]


def _pairs(dataset: TokenizedDataset) -> list[PreferenceSample]:
    sequences = to_samples(dataset)
    return [{"chosen": chosen, "rejected": rejected} for chosen, rejected in zip(sequences[::2], sequences[1::2])]
