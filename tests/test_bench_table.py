"""The README's ratio table (`benchmarks/table.py`): a row run once gives one line, as the committed tables have it;
a row that one command ran several times (`run_gpu.sh` tags each run's lines with its round) gives one line per run,
each litft run set against the peers' run of the same round, and a line with every run's ratio and their median."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def table():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import table

        yield table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def record(peer, tokens_per_s, round_=None, task="lora", **extra):
    fields = dict(peer=peer, task=task, shape="llama-8b", batch=4, seq=2048, tokens_per_s=tokens_per_s,
                  peak_mem_gib=40.0 if peer == "litft" else 45.0, **extra)
    if round_ is not None:
        fields["round"] = round_
    return json.dumps(fields)


def test_a_row_run_once_is_one_line_with_its_ratio(table):
    lines = table.table_lines(table.read_records([
        "a log line that is not JSON",
        record("litft", 17000, compile=False), record("litft", 18000, compile=True), record("unsloth", 16000),
    ]))
    assert len(lines) == 3  # the header, its rule, the row
    assert "18,000, 40.0 (compiled)" in lines[2]  # litft's fastest variant
    assert "1.12x (unsloth)" in lines[2] and "0.89x (unsloth)" in lines[2]


def test_a_row_run_several_times_pairs_each_run_and_gives_the_median(table):
    runs = [(18000, 16000), (17000, 16500), (17600, 16000)]  # ratios 1.125, 1.030, 1.100
    lines = table.table_lines(table.read_records(
        [line for round_, (ours, theirs) in enumerate(runs)
         for line in (record("litft", ours, round_), record("unsloth", theirs, round_))]
    ))
    rows = lines[2:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| lora (run 1 of 3)", "| lora (run 2 of 3)", "| lora (run 3 of 3)", "| lora, 3 runs"]
    assert "1.12x" in rows[0] and "1.03x" in rows[1] and "1.10x" in rows[2]
    assert "each run 1.125, 1.030, 1.100; median 1.100x, lowest 1.030x" in rows[3]
