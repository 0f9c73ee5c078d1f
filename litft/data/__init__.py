"""Datasets to token batches.

- `files`: reading .json / .jsonl / .parquet / .txt files and folders, one record at a time;
- `formats`: detecting the format and turning records into chat messages, text or preference pairs;
- `rendering`: chat template rendering, assistant-only masking, length fitting;
- `loading`: the pipeline (parallel tokenization, cache, validation split) behind `load_datasets`;
- `cache`: the on-disk cache of tokenized datasets;
- `packing`: samples into (packed) rows and padded batches.
"""

from litft.data.config import DataConfig
from litft.data.loading import PreferenceSample, load_datasets, load_preference_datasets
from litft.data.packing import collate, make_rows
from litft.data.rendering import IGNORE_INDEX, Sample

__all__ = [
    "DataConfig",
    "IGNORE_INDEX",
    "PreferenceSample",
    "Sample",
    "collate",
    "load_datasets",
    "load_preference_datasets",
    "make_rows",
]
