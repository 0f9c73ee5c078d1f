"""The loading pipeline: cache, parallel workers, lengths, validation split, text and preference data."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors import safe_open

from litft.chat_templates import resolve_chat_template
from litft.data import DataConfig, IGNORE_INDEX, load_datasets, load_preference_datasets
from litft.errors import ConfigError, DataError
from litft.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def stories(stories_dir):
    tokenizer = Tokenizer.from_checkpoint(stories_dir)
    return tokenizer, resolve_chat_template(tokenizer, "plain")


def quiet_load(config, stories, log_lines=None):
    log = log_lines.append if log_lines is not None else (lambda line: None)
    return load_datasets(config, *stories, log=log)


def same_samples(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["targets"], y["targets"]) for x, y in zip(a, b)
    )


def test_second_run_reuses_the_cache_and_settings_change_the_key(tmp_path, data_dir, stories):
    source = data_dir / "chat" / "oasst_100.messages.jsonl"
    path = tmp_path / "chat.jsonl"
    path.write_bytes(source.read_bytes())
    config = DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), max_seq_length=256)
    first_log, second_log = [], []
    first, _ = quiet_load(config, stories, first_log)
    assert any("detected the 'messages' format" in line for line in first_log)
    assert any("truncated" in line for line in first_log)
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".safetensors"
    with safe_open(str(cached[0]), framework="numpy") as handle:  # plain arrays, no pickle
        assert set(handle.keys()) == {"tokens", "trained", "offsets"}
    second, _ = quiet_load(config, stories, second_log)
    assert any("reusing the tokenized cache" in line for line in second_log)
    assert same_samples(first, second)

    quiet_load(DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), max_seq_length=128), stories)
    assert len(list((tmp_path / "cache").iterdir())) == 2
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed: tokenize again
    third_log = []
    quiet_load(config, stories, third_log)
    assert not any("reusing" in line for line in third_log)


def test_parallel_workers_give_the_same_samples(tmp_path, data_dir, stories):
    path = data_dir / "chat" / "identity_500.sharegpt.json"
    one, _ = quiet_load(DataConfig(path=str(path), cache_dir=str(tmp_path / "a"), num_workers=1), stories)
    two, _ = quiet_load(DataConfig(path=str(path), cache_dir=str(tmp_path / "b"), num_workers=2), stories)
    assert len(one) == 500 and same_samples(one, two)


def test_overlong_samples_are_truncated_or_dropped_and_counted(tmp_path, data_dir, stories):
    path = data_dir / "instruct" / "oasst_first_turn_100.alpaca.json"
    truncate_log, drop_log = [], []
    truncated, _ = quiet_load(DataConfig(path=str(path), cache_dir=str(tmp_path), max_seq_length=200), stories,
                              truncate_log)
    dropped, _ = quiet_load(DataConfig(path=str(path), cache_dir=str(tmp_path), max_seq_length=200,
                                       overlong="drop"), stories, drop_log)
    assert len(truncated) == 100 and all(len(s["input_ids"]) <= 200 for s in truncated)
    assert all((s["targets"] != IGNORE_INDEX).any() for s in truncated)
    full, _ = quiet_load(DataConfig(path=str(path), cache_dir=str(tmp_path), max_seq_length=4096), stories)
    num_truncated = sum(len(s["input_ids"]) > 200 for s in full)
    assert sum(len(s["input_ids"]) == 200 for s in truncated) >= num_truncated > 0
    assert f"{num_truncated} truncated" in truncate_log[-1]
    assert len(dropped) < 100 and f"{100 - len(dropped)} dropped as longer" in drop_log[-1]
    cached = set(tmp_path.iterdir())
    with pytest.raises(DataError, match="no sample has a trained token left"):
        quiet_load(DataConfig(path=str(path), cache_dir=str(tmp_path), max_seq_length=4, overlong="drop"), stories)
    assert set(tmp_path.iterdir()) == cached


def test_validation_split_is_reproducible(tmp_path, data_dir, stories):
    path = data_dir / "chat" / "identity_500.sharegpt.json"

    def split(seed):
        config = DataConfig(path=str(path), cache_dir=str(tmp_path), val_split=0.1, seed=seed)
        return quiet_load(config, stories)

    train, validation = split(1)
    assert len(train) == 450 and len(validation) == 50
    again_train, again_validation = split(1)
    assert same_samples(train, again_train) and same_samples(validation, again_validation)
    _, other_validation = split(2)
    assert not same_samples(validation, other_validation)

    config = DataConfig(path=str(path), val_path=str(data_dir / "chat" / "oasst_100.sharegpt.json"),
                        cache_dir=str(tmp_path), limit=10)
    train, validation = quiet_load(config, stories)
    assert len(train) == 10 and len(validation) == 10
    with pytest.raises(ConfigError, match="--data.val_split and --data.val_path"):
        quiet_load(DataConfig(path=str(path), val_path=str(path), val_split=0.1), stories)


def test_text_format_trains_everything_with_bos_and_eos(tmp_path, stories):
    tokenizer = stories[0]
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("Once upon a time there was a cat.")
    (folder / "b.jsonl").write_text(json.dumps({"text": "The dog ran home."}) + "\n")
    samples, _ = quiet_load(DataConfig(path=str(folder), format="text", cache_dir=str(tmp_path / "cache")), stories)
    assert len(samples) == 2
    expected = tokenizer.encode("Once upon a time there was a cat.", add_eos=True)
    assert expected[0] == tokenizer.bos_id and expected[-1] == tokenizer.eos_id
    assert samples[0]["input_ids"].tolist() == expected[:-1]
    assert samples[0]["targets"].tolist() == expected[1:]


def test_preference_pairs_share_a_masked_prompt(tmp_path, data_dir, stories):
    tokenizer = stories[0]
    for name in ("oasst_pairs_99.jsonl", "oasst_pairs_212.conversational.jsonl"):
        config = DataConfig(path=str(data_dir / "preference" / name), cache_dir=str(tmp_path), max_seq_length=512,
                            overlong="drop", val_split=0.1)
        log = []
        train, validation = load_preference_datasets(config, *stories, log=log.append)
        assert train and validation and any("dropped as longer" in line for line in log)
        for pair in train[:20]:
            chosen, rejected = pair["chosen"], pair["rejected"]
            prompt_length = int((chosen["targets"] != IGNORE_INDEX).nonzero()[0])
            assert int((rejected["targets"] != IGNORE_INDEX).nonzero()[0]) == prompt_length
            assert torch.equal(chosen["input_ids"][: prompt_length + 1], rejected["input_ids"][: prompt_length + 1])
            for sample in (chosen, rejected):
                assert sample["targets"][-1].item() == tokenizer.eos_id
                assert (sample["targets"][prompt_length:] != IGNORE_INDEX).all()


def test_preview_marks_trained_tokens_and_counts(tmp_path, data_dir, capsys):
    from litft.commands.data import preview

    config = DataConfig(path=str(data_dir / "chat" / "identity_500.sharegpt.json"), cache_dir=str(tmp_path),
                        max_seq_length=256, limit=20)
    preview(data=config, num_samples=2)
    output = capsys.readouterr().out
    assert "Who are you?\n[[" in output and "</s>]]" in output  # the answer and its EOS trained, the question not
    assert output.count("--- sample") == 2
    assert "samples: 20 (from 20 records, sharegpt)" in output
    assert "packing efficiency" in output and "truncated: 0" in output
    # The summary's token count is the loading log's (every token), with the model's inputs beside it.
    logged = re.search(r"20 samples from 20 records \(sharegpt\), (\d+) tokens, (\d+) trained", output)
    assert logged, output
    tokens, trained = map(int, logged.groups())
    assert f"tokens: {tokens} ({tokens - 20} as model inputs, one fewer per sequence), {trained} trained" in output


def write_jsonl(path, count: int, word: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"instruction": f"{word} {i}?", "output": f"{word}."}) + "\n"
                            for i in range(count)))


def test_a_folder_leaves_out_hidden_files_and_the_validation_files_inside_it(tmp_path, stories):
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl", 6, "train")
    write_jsonl(folder / ".ipynb_checkpoints" / "train-checkpoint.jsonl", 6, "copy")  # an editor's copy
    write_jsonl(folder / ".hidden.jsonl", 3, "hidden")
    write_jsonl(folder / "val.jsonl", 2, "held")
    log_lines = []
    train, validation = quiet_load(DataConfig(path=str(folder), val_path=str(folder / "val.jsonl"),
                                              cache_dir=str(tmp_path / "cache")), stories, log_lines)
    assert len(train) == 6 and len(validation) == 2
    assert any("leaving out 1 file(s) of --data.val_path" in line for line in log_lines)
    tokenizer = stories[0]
    assert all("held" not in tokenizer.decode(sample["input_ids"].tolist()) for sample in train)
    # The same file for both is refused rather than silently validating on trained samples.
    with pytest.raises(DataError, match="--data.val_path .*: these are the training files of --data.path"):
        quiet_load(DataConfig(path=str(folder / "train.jsonl"), val_path=str(folder / "train.jsonl"),
                              cache_dir=str(tmp_path / "cache")), stories)


def test_a_missing_validation_path_fails_before_the_training_set_is_read(tmp_path, stories):
    broken = tmp_path / "train.jsonl"
    broken.write_text("not json\n")  # reading it would raise a different error first
    with pytest.raises(DataError, match=r"--data.val_path .*nope.jsonl: no such file"):
        quiet_load(DataConfig(path=str(broken), val_path=str(tmp_path / "nope.jsonl")), stories)


def test_an_unwritable_cache_folder_names_its_flag_or_is_skipped(tmp_path, stories, monkeypatch):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, 4, "q")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(DataError, match=r"--data.cache_dir .*a_file/cache: cannot write the tokenized cache"):
        quiet_load(DataConfig(path=str(path), cache_dir=str(blocker / "cache")), stories)
    monkeypatch.setenv("LITFT_CACHE_DIR", str(blocker / "cache"))  # the default folder: warn and go on
    log_lines = []
    train, _ = quiet_load(DataConfig(path=str(path)), stories, log_lines)
    assert len(train) == 4 and any("cannot write the tokenized cache" in line for line in log_lines)


def test_a_template_file_that_fails_gives_one_line(tmp_path, stories):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, 2, "q")
    tokenizer = stories[0]
    latin = tmp_path / "latin.jinja"
    latin.write_bytes("{{ 'caf\u00e9' }}".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"--data.template .*latin.jinja: not UTF-8 text"):
        resolve_chat_template(tokenizer, str(latin), flag="--data.template")
    adds_a_number = tmp_path / "adds.jinja"
    adds_a_number.write_text("{% for m in messages %}{{ m.content + 1 }}{% endfor %}")
    template = resolve_chat_template(tokenizer, str(adds_a_number), flag="--data.template")
    with pytest.raises(DataError, match=r"line 1: chat template 'adds.jinja' failed on the conversation: TypeError"):
        load_datasets(DataConfig(path=str(path), cache_dir=str(tmp_path / "cache")), tokenizer, template,
                      log=lambda line: None)


def test_empty_answers_are_pointed_out(tmp_path, stories):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "" if i in (1, 3) else "an answer"}) + "\n"
                            for i in range(5)))
    log_lines = []
    train, _ = quiet_load(DataConfig(path=str(path), cache_dir=str(tmp_path / "cache")), stories, log_lines)
    assert len(train) == 5  # still trained (the EOS is a target), but the log says so
    warnings = [line for line in log_lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "2 of 5 samples train only their end-of-turn token" in warnings[0]
    assert "the first is sample 2" in warnings[0]


def test_a_hub_dataset_name_says_to_download_it_first(tmp_path, stories, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"--data.path tatsu-lab/alpaca: no such file or folder; litft reads local "
                                        r"files: .*hf download tatsu-lab/alpaca --repo-type dataset"):
        quiet_load(DataConfig(path="tatsu-lab/alpaca"), stories)
    (tmp_path / "data").mkdir()  # a local folder that exists: a missing file in it is only missing
    with pytest.raises(DataError, match=r"--data.path data/train.jsonl: no such file or folder$"):
        quiet_load(DataConfig(path="data/train.jsonl"), stories)


def test_conversations_ending_on_a_user_turn_are_noted(tmp_path, stories):
    path = tmp_path / "train.jsonl"
    answered = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    records = [answered, answered + [{"role": "user", "content": "and then?"}], answered]
    path.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in records))
    log_lines = []
    train, _ = quiet_load(DataConfig(path=str(path), cache_dir=str(tmp_path / "cache")), stories, log_lines)
    assert len(train) == 3
    notes = [line for line in log_lines if line.startswith("note:")]
    assert len(notes) == 1 and "1 of 3 conversations end on a turn other than the assistant's" in notes[0]
    log_lines = []  # training on prompts trains that turn: nothing to note
    quiet_load(DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), train_on_prompt=True), stories,
               log_lines)
    assert not any(line.startswith("note:") for line in log_lines)


def test_long_text_splits_into_windows_that_train_every_token_once(tmp_path, stories):
    tokenizer = stories[0]
    document = tmp_path / "book.txt"
    document.write_text(" ".join(f"Once upon a time there was a cat number {i}." for i in range(60)))
    log_lines = []
    samples, _ = quiet_load(DataConfig(path=str(document), overlong="split", max_seq_length=64,
                                       cache_dir=str(tmp_path / "cache")), stories, log_lines)
    whole = tokenize_whole(tokenizer, document.read_text())
    assert len(whole) > 5 * 64 and len(samples) == -(-(len(whole) - 1) // 64)
    assert all(len(sample["input_ids"]) <= 64 for sample in samples)
    targets = torch.cat([sample["targets"] for sample in samples])
    assert torch.equal(targets, torch.tensor(whole[1:]))  # each token after the first: a target exactly once
    assert any("1 split into windows" in line for line in log_lines)
    write_jsonl(tmp_path / "chat.jsonl", 2, "q")  # a chat sample cut into windows would lose its prompt: refused
    with pytest.raises(DataError, match="--data.overlong split: cuts text documents into windows"):
        quiet_load(DataConfig(path=str(tmp_path / "chat.jsonl"), overlong="split"), stories)


def tokenize_whole(tokenizer, text: str) -> list[int]:
    from litft.data.rendering import tokenize_text

    return tokenize_text(tokenizer, text).tokens
