"""Rendering and masking against Hugging Face: the same messages and template give the same text, the same tokens
and an assistant mask equal to transformers' `return_assistant_tokens_mask`, on the real files in tests/data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from litft.chat_templates import resolve_chat_template
from litft.data import DataConfig, IGNORE_INDEX, load_datasets
from litft.data.files import iter_records
from litft.data.formats import FieldNames, detect_format, record_to_messages
from litft.data.rendering import Tokenized, assistant_spans, fit_length, tokenize_messages
from litft.errors import DataError
from litft.tokenizer import Tokenizer

# A Zephyr-style template with HF's {% generation %} markers around what the assistant must produce, and a BOS
# written by the template itself (so no second one may be added).
GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CHAT_FILES = ["chat/oasst_100.messages.jsonl", "chat/oasst_100.sharegpt.json", "chat/identity_500.sharegpt.json",
              "instruct/oasst_first_turn_100.alpaca.json"]


def checkpoint_with_template(folder: Path, tokenizer_dir: Path, bos: str, eos: str, template: str) -> Path:
    folder.mkdir()
    shutil.copy(tokenizer_dir / "tokenizer.json", folder / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=["gpt-neox-20b", "stories260K"])
def tokenizer_dir(request, tmp_path_factory, data_dir, stories_dir) -> Path:
    if request.param == "gpt-neox-20b":
        source, bos, eos = data_dir / "tokenizers" / "gpt-neox-20b", "<|endoftext|>", "<|endoftext|>"
    else:
        source, bos, eos = stories_dir, "<s>", "</s>"
    return checkpoint_with_template(tmp_path_factory.mktemp("tok") / request.param, source, bos, eos,
                                    GENERATION_TEMPLATE)


def conversations(path: Path, limit: int = 40) -> list[list[dict]]:
    fields = FieldNames()
    found = []
    for location, record in iter_records([path]):
        found.append(record_to_messages(record, detect_format(record, fields, location), fields, location))
        if len(found) == limit:
            break
    return found


@pytest.mark.parametrize("relative", CHAT_FILES)
def test_tokens_and_mask_match_transformers(tokenizer_dir, data_dir, relative):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer = Tokenizer.from_checkpoint(tokenizer_dir)
    template = resolve_chat_template(tokenizer, "auto")
    multi_turn = 0
    for messages in conversations(data_dir / relative):
        text, _ = assistant_spans(template, messages, "test")
        assert text == hf.apply_chat_template(messages, tokenize=False)
        expected = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ours = tokenize_messages(tokenizer, template, messages, train_on_prompt=False, location="test")
        # The template writes BOS; the tokenizer adds none on top (stories260K adds one by default).
        assert ours.tokens == expected["input_ids"]
        assert ours.tokens.count(tokenizer.bos_id) == 1 or tokenizer.bos_id == tokenizer.eos_id
        assert [int(flag) for flag in ours.trained] == expected["assistant_masks"]
        # Every assistant turn ends with a trained EOS.
        turns = sum(message["role"] == "assistant" for message in messages)
        trained_eos = [i for i, t in enumerate(ours.tokens) if t == tokenizer.eos_id and ours.trained[i]]
        assert len(trained_eos) == turns
        multi_turn += turns > 1
    if "identity" in relative:
        assert multi_turn > 0  # the file's multi-turn chats train every assistant turn, not only the last


def test_labels_are_ignored_exactly_on_non_assistant_tokens(tokenizer_dir, data_dir, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer = Tokenizer.from_checkpoint(tokenizer_dir)
    template = resolve_chat_template(tokenizer, "auto")
    path = data_dir / "chat" / "identity_500.sharegpt.json"
    config = DataConfig(path=str(path), cache_dir=str(tmp_path), max_seq_length=4096, limit=30)
    samples, validation = load_datasets(config, tokenizer, template, log=lambda line: None)
    assert validation is None and len(samples) == 30
    for sample, messages in zip(samples, conversations(path, limit=30)):
        expected = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = torch.tensor(expected["input_ids"]), torch.tensor(expected["assistant_masks"]).bool()
        assert torch.equal(sample["input_ids"], ids[:-1])
        assert torch.equal(sample["targets"], torch.where(mask[1:], ids[1:], IGNORE_INDEX))
        trained_targets = sample["targets"][sample["targets"] != IGNORE_INDEX]
        assert trained_targets[-1].item() == tokenizer.eos_id  # the "\n" after the last EOS is not trained


def test_train_on_prompt_trains_every_token(stories_dir, data_dir, tmp_path):
    tokenizer = Tokenizer.from_checkpoint(stories_dir)
    template = resolve_chat_template(tokenizer, "plain")
    config = DataConfig(path=str(data_dir / "instruct" / "oasst_first_turn_100.alpaca.json"), limit=5,
                        train_on_prompt=True, max_seq_length=4096, cache_dir=str(tmp_path))
    samples, _ = load_datasets(config, tokenizer, template, log=lambda line: None)
    for sample in samples:
        assert torch.equal(sample["targets"][:-1], sample["input_ids"][1:])
        assert sample["targets"][-1].item() == tokenizer.eos_id


def test_builtin_template_adds_bos_once_and_masks_the_prompt(stories_dir):
    tokenizer = Tokenizer.from_checkpoint(stories_dir)  # adds BOS by default; "plain" writes none
    template = resolve_chat_template(tokenizer, "plain")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ours = tokenize_messages(tokenizer, template, messages, False, "test")
    assert ours.tokens[0] == tokenizer.bos_id and ours.tokens.count(tokenizer.bos_id) == 1
    assert tokenizer.decode([t for t, trained in zip(ours.tokens, ours.trained) if trained],
                            skip_special_tokens=False) == "Hello</s>"


def test_template_that_rewrites_earlier_turns_is_refused(stories_dir, tmp_path):
    # Like templates that drop earlier reasoning: the first answer renders differently once a later turn follows.
    template_source = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[hidden]"
                       "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
    folder = checkpoint_with_template(tmp_path / "rewrites", stories_dir, "<s>", "</s>", template_source)
    tokenizer = Tokenizer.from_checkpoint(folder)
    template = resolve_chat_template(tokenizer, "auto")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(DataError, match="record 7.*chat template 'checkpoint'"):
        tokenize_messages(tokenizer, template, messages, False, "record 7")


def test_truncation_keeps_the_start_of_the_answer():
    prompt, answer = list(range(10, 30)), list(range(30, 40))
    sequence = Tokenized([1, *prompt, *answer], [False] * 21 + [True] * 10)
    short_prompt = fit_length(Tokenized([1, 5, *answer], [False, False] + [True] * 10), 6, "truncate", True)
    assert short_prompt.tokens == [1, 5, 30, 31, 32, 33]  # the end of the answer is cut
    cut = fit_length(sequence, 12, "truncate", has_bos=True)
    assert len(cut.tokens) == 12 and cut.tokens[0] == 1
    assert cut.tokens[1:] == [*prompt[-5:], *answer[:6]]  # the end of the prompt and the start of the answer
    assert cut.trained == [False] * 6 + [True] * 6
    short_answer = fit_length(Tokenized([1, *prompt, 30, 31], [False] * 21 + [True] * 2), 12, "truncate", True)
    assert short_answer.tokens == [1, *prompt[-9:], 30, 31]
    assert fit_length(sequence, 12, "drop", has_bos=True) is None
    assert fit_length(sequence, 31, "drop", has_bos=True) is sequence
