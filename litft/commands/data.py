"""`litft data preview`: a dataset as the model will see it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from litft.data import DataConfig, make_rows
from litft.data.cache import TokenizedDataset
from litft.data.loading import dataset_files, detect_dataset_format, to_samples, tokenize_dataset
from litft.errors import ConfigError

STORIES_DIR = Path(__file__).resolve().parents[1] / "assets" / "stories260K"
TRAINED_COLOR, MASKED_COLOR, RESET = "\033[32m", "\033[2m", "\033[0m"


def preview(checkpoint: Path | None = None, data: DataConfig = DataConfig(), num_samples: int = 3) -> None:
    """Show a dataset's first samples as the model will see them.

    Trained tokens are marked apart from masked ones (green on a terminal, else [[in brackets]]), followed by
    counts: samples, tokens, trained tokens, truncated and dropped samples, packing efficiency.

    Example: litft data preview --checkpoint checkpoints/Qwen/Qwen2.5-0.5B-Instruct --data.path train.jsonl

    Args:
        checkpoint: Checkpoint folder whose tokenizer and chat template are used (default: the bundled
            stories260K tiny model).
        data: The dataset and how it is rendered (see `--data.*`).
        num_samples: How many samples to print.
    """
    from litft.chat_templates import resolve_chat_template
    from litft.tokenizer import Tokenizer

    if num_samples < 0:
        raise ConfigError(f"--num_samples {num_samples}: must be 0 or more")
    tokenizer = Tokenizer.from_checkpoint(checkpoint if checkpoint is not None else STORIES_DIR)
    data.validate()
    train_files, _ = dataset_files(data)  # checks --data.val_path too, and leaves its files out of the training set
    data_format = detect_dataset_format(data.path, data, files=train_files)
    template = None if data_format == "text" else resolve_chat_template(tokenizer, data.template, flag="--data.template")
    if template is not None:
        print(f"chat template: {template.name}")
    preference = data_format == "preference"
    dataset = tokenize_dataset(data.path, "--data.path", data, tokenizer, template, preference, files=train_files)

    color = sys.stdout.isatty()
    legend = f"{TRAINED_COLOR}trained{RESET}, {MASKED_COLOR}masked{RESET}" if color else "[[trained]], masked"
    print(f"tokens shown as: {legend}")
    group = 2 if preference else 1
    for index in range(min(num_samples, len(dataset) // group)):
        for member, title in enumerate(("chosen", "rejected") if preference else ("",)):
            sequence = index * group + member
            start, end = int(dataset.offsets[sequence]), int(dataset.offsets[sequence + 1])
            tokens = dataset.tokens[start:end].tolist()
            trained = dataset.trained[start:end].tolist()
            trained[0] = False  # the first token is never predicted
            heading = f"sample {index + 1}" + (f" ({title})" if title else "")
            print(f"\n--- {heading}: {len(tokens)} tokens, {sum(trained)} trained ---")
            print(marked_text(tokenizer, tokens, trained, color))
    print()
    print(summary(dataset, data, preference))


def marked_text(tokenizer: Any, tokens: list[int], trained: list[bool], color: bool) -> str:
    """The decoded tokens with each run of trained tokens marked: green on a terminal, else in [[ ]]."""
    pieces = []
    decoded = ""
    run_start = 0
    for run_end in range(1, len(tokens) + 1):
        if run_end < len(tokens) and trained[run_end] == trained[run_start]:
            continue
        # Decoding the whole prefix keeps the spacing a tokenizer only gets right in context.
        text = tokenizer.decode(tokens[:run_end], skip_special_tokens=False)
        piece = text[len(decoded):] if text.startswith(decoded) else tokenizer.decode(
            tokens[run_start:run_end], skip_special_tokens=False)
        decoded = text
        if trained[run_start]:
            pieces.append(f"{TRAINED_COLOR}{piece}{RESET}" if color else f"[[{piece}]]")
        else:
            pieces.append(f"{MASKED_COLOR}{piece}{RESET}" if color else piece)
        run_start = run_end
    return "".join(pieces)


def summary(dataset: TokenizedDataset, data: DataConfig, preference: bool) -> str:
    counts = dataset.counts
    samples = to_samples(dataset)
    inputs = sum(len(sample["input_ids"]) for sample in samples)
    trained = sum(int((sample["targets"] != -100).sum()) for sample in samples)
    rows = make_rows(samples, data.max_seq_length, pack=True, seed=data.seed)
    efficiency = inputs / (len(rows) * data.max_seq_length)
    kind = "pairs" if preference else "samples"
    return "\n".join([
        f"{kind}: {len(samples) // (2 if preference else 1)} (from {counts['records']} records, {dataset.format})",
        # The loading log counts every token; a sample's inputs are all of them but its last, which is only a target.
        f"tokens: {len(dataset.tokens)} ({inputs} as model inputs, one fewer per sequence), {trained} trained",
        f"truncated: {counts['truncated']}",
        f"dropped: {counts['dropped_overlong']} longer than --data.max_seq_length {data.max_seq_length}, "
        f"{counts['dropped_untrained']} with nothing to train",
        f"packing efficiency (--data.pack true): {efficiency:.1%} of {len(rows)} rows of {data.max_seq_length} tokens",
    ])
