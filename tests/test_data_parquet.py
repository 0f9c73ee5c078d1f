"""Parquet files (where pyarrow is installed) go through the same pipeline as JSON."""

import json

import pytest

from litft.data.files import iter_records

pyarrow = pytest.importorskip("pyarrow")
import pyarrow.parquet as parquet  # noqa: E402


def test_parquet_records_equal_the_json_ones(tmp_path, data_dir):
    records = json.loads((data_dir / "instruct" / "oasst_first_turn_100.alpaca.json").read_text())[:20]
    table = pyarrow.Table.from_pylist(records)
    path = tmp_path / "alpaca.parquet"
    parquet.write_table(table, path, row_group_size=7)  # several row groups: reading streams them
    read = [record for _, record in iter_records([path])]
    assert read == records


def test_a_broken_parquet_file_is_one_clear_line(tmp_path):
    from litft.errors import DataError

    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError) as error:
        list(iter_records([path]))
    assert str(path) in str(error.value) and "\n" not in str(error.value)
