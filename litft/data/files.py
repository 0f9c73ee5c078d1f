"""Dataset files in, one record at a time.

A dataset is a `.json`, `.jsonl`, `.parquet` or `.txt` file, or a folder of them (read in sorted order). Records
come out lazily as `(location, record)` pairs, where the location ("data.jsonl line 12", "data.json record 3")
is what every error about that record names. JSONL is read line by line so a large file never sits in memory
whole; a JSON array is parsed element by element (the file's text is read once) so a bad element still has a line
number. A `.txt` file is one record `{"text": <whole file>}`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from litft.errors import DataError

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")

Record = dict[str, Any]


def data_files(path: str | Path, flag: str = "--data.path", exclude: Collection[Path] = ()) -> list[Path]:
    """The files a `--data.path` names: the file itself, or every data file under a folder, sorted. Hidden files
    and folders (".ipynb_checkpoints/", ".cache/") are not data; nor are the `exclude` files (the validation files
    when they lie inside the training folder)."""
    path = Path(path).expanduser()
    if path.is_dir():
        excluded = {file.resolve() for file in exclude}
        files = sorted(
            file for file in path.rglob("*")
            if file.is_file() and file.suffix.lower() in DATA_SUFFIXES
            and not any(part.startswith(".") for part in file.relative_to(path).parts)
            and file.resolve() not in excluded
        )
        if not files:
            raise DataError(f"{flag} {path}: the folder holds no {', '.join(DATA_SUFFIXES)} files"
                            + (" besides the validation files" if excluded else ""))
        return files
    if not path.is_file():
        hint = ""
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not path.parent.exists():  # reads like ORG/NAME
            hint = (f"; litft reads local files: a Hub dataset must be downloaded first, e.g. `hf download "
                    f"{path} --repo-type dataset --local-dir data/{path.name}`, then --data.path data/{path.name}")
        raise DataError(f"{flag} {path}: no such file or folder{hint}")
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise DataError(f"{flag} {path}: unsupported file type; use one of {', '.join(DATA_SUFFIXES)}")
    return [path]


def iter_records(files: list[Path]) -> Iterator[tuple[str, Record]]:
    """Every record of every file, in order, each with its location. Raises DataError for an empty file."""
    for file in files:
        suffix = file.suffix.lower()
        if suffix == ".jsonl":
            records = _iter_jsonl(file)
        elif suffix == ".json":
            records = _iter_json(file)
        elif suffix == ".parquet":
            records = _iter_parquet(file)
        else:
            records = _iter_txt(file)
        count = 0
        for location, record in records:
            count += 1
            yield location, record
        if count == 0:
            raise DataError(f"{file}: the file holds no records; remove it or add data")


def _iter_jsonl(file: Path) -> Iterator[tuple[str, Record]]:
    with open(file, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            location = f"{file} line {line_number}"
            line = _decode(raw, location).strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{location}: not valid JSON ({error.msg} at column {error.colno})") from None
            yield location, _object_or_error(record, location)


def _iter_json(file: Path) -> Iterator[tuple[str, Record]]:
    text = _decode(file.read_bytes(), str(file))
    start = _skip_whitespace(text, 0)
    if start == len(text):
        return
    if text[start] != "[":
        # Many `.json` datasets are really JSON Lines: one object per line shows up as "Extra data" after the first.
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg == "Extra data":
                yield from _iter_jsonl(file)
                return
            raise DataError(f"{file} line {error.lineno} column {error.colno}: not valid JSON ({error.msg})") from None
        yield f"{file} record 1", _object_or_error(record, f"{file} record 1")
        return
    decoder = json.JSONDecoder()
    position = _skip_whitespace(text, start + 1)
    record_number = 0
    line_number, line_counted_to = 1, 0
    while position < len(text) and text[position] != "]":
        record_number += 1
        line_number += text.count("\n", line_counted_to, position)
        line_counted_to = position
        location = f"{file} record {record_number} (line {line_number})"
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(f"{file} line {error.lineno} column {error.colno}: not valid JSON ({error.msg})") from None
        yield location, _object_or_error(record, location)
        position = _skip_whitespace(text, position)
        if position < len(text) and text[position] == ",":
            position = _skip_whitespace(text, position + 1)
        elif position < len(text) and text[position] != "]":
            line = text.count("\n", 0, position) + 1
            raise DataError(f"{file} line {line}: not valid JSON (expected ',' or ']' after record {record_number})")
    if position >= len(text):
        raise DataError(f"{file}: not valid JSON (the list is never closed with ']')")
    if _skip_whitespace(text, position + 1) != len(text):
        line = text.count("\n", 0, position + 1) + 1
        raise DataError(f"{file} line {line}: not valid JSON (extra data after the closing ']')")


def _iter_parquet(file: Path) -> Iterator[tuple[str, Record]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{file}: reading .parquet files needs pyarrow (`pip install pyarrow`)") from None
    import pyarrow

    try:
        reader = pq.ParquetFile(file)
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"{file}: not a readable parquet file ({str(error).splitlines()[0]})") from None
    row_number = 0
    for batch in reader.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row_number += 1
            yield f"{file} row {row_number}", record


def _iter_txt(file: Path) -> Iterator[tuple[str, Record]]:
    text = _decode(file.read_bytes(), str(file))
    if text.strip():
        yield str(file), {"text": text}


def _decode(raw: bytes, location: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{location}: not UTF-8 text (bad byte at offset {error.start}); re-save the file as UTF-8"
        ) from None


def _object_or_error(record: Any, location: str) -> Record:
    if not isinstance(record, dict):
        raise DataError(f"{location}: expected a JSON object with named fields, got {type(record).__name__}")
    return record


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position
