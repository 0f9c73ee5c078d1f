"""The `--data.*` flags."""

from __future__ import annotations

from dataclasses import dataclass

from litft.data.formats import FORMATS
from litft.errors import ConfigError

OVERLONG_CHOICES = ("truncate", "drop", "split")


@dataclass
class DataConfig:
    """Which dataset to train on and how to turn it into token batches.

    Args:
        path: A .json, .jsonl, .parquet or .txt file, or a folder of them.
        format: alpaca, sharegpt, messages, prompt_completion, text or preference; "auto" detects it from the
            fields of the first record and logs what it found.
        fields: Field names to remap, canonical name -> name in the file, e.g. '{"instruction": "question",
            "output": "answer"}'. Canonical names: instruction, input, output, system, conversations, from, value,
            messages, role, content, prompt, completion, text, chosen, rejected.
        template: Chat template: "auto" (the checkpoint's own, else a built-in), or alpaca, chatml, llama3, plain.
        train_on_prompt: Also train on system and user turns (by default only assistant turns are trained).
        max_seq_length: The most tokens in one row the model sees (a sample, or a packed row of samples).
        overlong: What to do with a sample longer than max_seq_length: "truncate" (keeping the start of the
            answer), "drop", or for text data "split" (into consecutive windows of max_seq_length tokens that
            overlap by one, so that every token of a long document is trained once).
        pack: Pack several samples into each row of max_seq_length tokens, with attention and positions kept
            per sample. Without it, batches are padded to their longest sample.
        val_split: Fraction of the samples held out for validation (0 for none).
        val_path: A separate validation file or folder (instead of val_split).
        seed: Seed of the validation split and of the packing order.
        num_workers: Processes that tokenize the dataset in parallel.
        cache_dir: Where tokenized datasets are cached (default: $LITFT_CACHE_DIR/data or ~/.cache/litft/data).
        limit: Use only the first N records of each file set (for quick experiments).
    """

    path: str | None = None
    format: str = "auto"
    fields: dict[str, str] | None = None
    template: str = "auto"
    train_on_prompt: bool = False
    max_seq_length: int = 2048
    overlong: str = "truncate"
    pack: bool = False
    val_split: float = 0.0
    val_path: str | None = None
    seed: int = 42
    num_workers: int = 1
    cache_dir: str | None = None
    limit: int | None = None

    def validate(self) -> None:
        """Raises ConfigError naming the first flag that is out of range or contradicts another."""
        if not self.path:
            raise ConfigError("--data.path is required: a .json, .jsonl, .parquet or .txt file, or a folder of them")
        if self.format not in FORMATS:
            raise ConfigError(f"--data.format {self.format!r}: use one of {', '.join(FORMATS)}")
        if self.overlong not in OVERLONG_CHOICES:
            raise ConfigError(f"--data.overlong {self.overlong!r}: use one of {', '.join(OVERLONG_CHOICES)}")
        if self.max_seq_length < 2:
            raise ConfigError(f"--data.max_seq_length {self.max_seq_length}: must be at least 2")
        if not 0.0 <= self.val_split < 1.0:
            raise ConfigError(f"--data.val_split {self.val_split}: must be at least 0 and below 1")
        if self.val_split and self.val_path:
            raise ConfigError("--data.val_split and --data.val_path: pass one or the other")
        if self.num_workers < 1:
            raise ConfigError(f"--data.num_workers {self.num_workers}: must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--data.limit {self.limit}: must be at least 1")
