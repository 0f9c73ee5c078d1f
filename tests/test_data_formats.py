"""Formats: detection, field remapping, and one clear DataError line for every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from litft.chat_templates import resolve_chat_template
from litft.data import DataConfig, load_datasets, load_preference_datasets
from litft.data.files import iter_records
from litft.data.formats import FieldNames, detect_format, record_to_messages, record_to_preference
from litft.errors import DataError
from litft.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def stories(stories_dir):
    tokenizer = Tokenizer.from_checkpoint(stories_dir)
    return tokenizer, resolve_chat_template(tokenizer, "plain")


def load(path: Path, stories, cache_dir: Path, **settings):
    config = DataConfig(path=str(path), cache_dir=str(cache_dir), **settings)
    return load_datasets(config, *stories, log=lambda line: None)


@pytest.mark.parametrize("relative, expected", [
    ("instruct/oasst_first_turn_100.alpaca.json", "alpaca"),
    ("chat/oasst_100.messages.jsonl", "messages"),
    ("chat/oasst_100.sharegpt.json", "sharegpt"),
    ("chat/identity_500.sharegpt.json", "sharegpt"),
    ("preference/oasst_pairs_99.jsonl", "preference"),
    ("preference/oasst_pairs_212.conversational.jsonl", "preference"),
])
def test_detects_the_format_of_every_real_file(data_dir, relative, expected):
    location, record = next(iter_records([data_dir / relative]))
    assert detect_format(record, FieldNames(), location) == expected


def test_all_chat_formats_give_the_same_conversation(data_dir):
    """The OpenAssistant chats exist as alpaca, messages and sharegpt: all three read as the same messages."""
    fields = FieldNames()

    def read(relative, data_format):
        return [record_to_messages(record, data_format, fields, location)
                for location, record in iter_records([data_dir / relative])]

    messages = read("chat/oasst_100.messages.jsonl", "messages")
    assert read("chat/oasst_100.sharegpt.json", "sharegpt") == messages
    first_turns = [conversation[:2] for conversation in messages]
    alpaca = read("instruct/oasst_first_turn_100.alpaca.json", "alpaca")
    assert len(alpaca) == len(first_turns)
    assert sum(a == b for a, b in zip(alpaca, first_turns)) >= 90  # records with an `input` differ on purpose


def test_alpaca_input_system_and_prompt_completion():
    fields = FieldNames()
    alpaca = {"instruction": "Sum", "input": "1 2", "output": "3", "system": "Be exact."}
    assert record_to_messages(alpaca, "alpaca", fields, "r") == [
        {"role": "system", "content": "Be exact."}, {"role": "user", "content": "Sum\n\n1 2"},
        {"role": "assistant", "content": "3"}]
    completion = {"prompt": "2+2=", "completion": "4"}
    assert record_to_messages(completion, "prompt_completion", fields, "r") == [
        {"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]


def test_field_remapping(tmp_path, stories):
    rows = [{"question": f"What is {i}?", "answer": f"It is {i}."} for i in range(4)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    remapped, _ = load(path, stories, tmp_path / "cache", fields={"instruction": "question", "output": "answer"})
    plain_path = tmp_path / "plain.jsonl"
    plain_path.write_text("\n".join(json.dumps({"instruction": r["question"], "output": r["answer"]}) for r in rows))
    plain, _ = load(plain_path, stories, tmp_path / "cache")
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(remapped, plain))
    with pytest.raises(DataError, match="--data.fields: unknown field name.*instructions"):
        FieldNames({"instructions": "q"})


def test_preference_pairs_from_strings_and_messages(data_dir):
    fields = FieldNames()
    strings = [record_to_preference(r, fields, loc) for loc, r in iter_records([data_dir / "preference/oasst_pairs_99.jsonl"])]
    assert strings[0].prompt[0]["role"] == "user" and strings[0].chosen[0]["role"] == "assistant"
    conversational = next(iter_records([data_dir / "preference/oasst_pairs_212.conversational.jsonl"]))
    pair = record_to_preference(conversational[1], fields, conversational[0])
    assert pair.prompt == strings[0].prompt and pair.chosen == strings[0].chosen
    # Without `prompt`, the messages chosen and rejected share become the prompt.
    full = {"chosen": pair.prompt + pair.chosen, "rejected": pair.prompt + pair.rejected}
    assert record_to_preference(full, fields, "r") == pair


BAD_FILES = [
    # (file name, content, expected message pattern)
    ("broken.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
     r"broken.jsonl line 2: not valid JSON"),
    ("broken.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]',
     r"broken.json line 3 column \d+: not valid JSON"),
    ("missing.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "a"}]',
     r"missing.json record 2 \(line 2\): missing field `output`"),
    ("number.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 5}\n',
     r"number.jsonl line 2: field `output` must be text, got int 5"),
    ("empty.jsonl", "", r"empty.jsonl: the file holds no records"),
    ("no_answer.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n',
     r"no_answer.jsonl line 1: the conversation has no assistant turn"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', r"latin1.jsonl line 1: not UTF-8 text"),
    ("unknown.jsonl", '{"question": "a", "answer": "b"}\n',
     r"unknown.jsonl line 1: cannot detect the dataset format.*--data.format"),
    ("role.jsonl", '{"conversations": [{"from": "robot", "value": "x"}]}\n', r"role.jsonl line 1: .*unknown from 'robot'"),
    ("not_object.json", '[["a", "b"]]', r"not_object.json record 1 \(line 1\): expected a JSON object"),
    ("null.jsonl", '{"instruction": "a", "output": null}\n',
     r"null.jsonl line 1: field `output` is null; give it text"),
    ("null_turns.jsonl", '{"messages": null}\n', r"null_turns.jsonl line 1: field `messages` is null"),
    ("system_later.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, '
     '{"role": "assistant", "content": "c"}]}\n',
     r"system_later.jsonl line 1: chat template 'alpaca' rejected .*a system message only as the first message"),
]


@pytest.mark.parametrize("name, content, pattern", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, stories, name, content, pattern):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if name == "system_later.jsonl":
        tokenizer = stories[0]
        stories = (tokenizer, resolve_chat_template(tokenizer, "alpaca"))
    with pytest.raises(DataError, match=pattern) as caught:
        load(path, stories, tmp_path / "cache")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_bad_preference_records(tmp_path, stories):
    cases = {
        '{"prompt": "q", "rejected": "b"}': "missing field `chosen`",
        '{"prompt": "q", "chosen": "same", "rejected": "same"}': "are identical",
        '{"prompt": "' + "long words " * 300 + '", "chosen": "a", "rejected": "b"}': "the prompt is .* tokens, longer",
    }
    for index, (line, pattern) in enumerate(cases.items()):
        path = tmp_path / f"pairs{index}.jsonl"
        path.write_text(line + "\n")
        config = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), max_seq_length=64)
        with pytest.raises(DataError, match=rf"pairs{index}.jsonl line 1: .*{pattern}"):
            load_preference_datasets(config, *stories, log=lambda line: None)
    assert not (tmp_path / "cache").exists()


def test_jsonl_records_stream_one_line_at_a_time(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text('{"text": "first"}\n{"text": "second"}\nnot json at all\n')
    records = iter_records([path])
    assert next(records) == (f"{path} line 1", {"text": "first"})  # the broken line 3 is not read yet
    assert next(records)[1] == {"text": "second"}
    with pytest.raises(DataError, match="line 3"):
        next(records)


def test_cli_preview_reports_bad_data_in_one_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "output": 7}\n')
    result = subprocess.run(
        [sys.executable, "-m", "litft", "data", "preview", "--data.path", str(path),
         "--data.cache_dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("litft: error: ") and "broken.jsonl line 1" in lines[0]
