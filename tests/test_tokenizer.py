"""litft.tokenizer against the reference implementations: transformers' fast tokenizers for tokenizer.json and
GPT-2 vocab/merges, the sentencepiece library for tokenizer.model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from litft.errors import CheckpointError
from litft.tokenizer import Tokenizer

TEXTS = [
    "Once upon a time, there was a little girl.",
    "  leading spaces\nand\ttabs  ",
    "naïve café 日本語 🙂",
    "",
]


def test_stories_matches_transformers_ids_offsets_and_specials(stories_dir):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(stories_dir)
    tokenizer = Tokenizer.from_checkpoint(stories_dir)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.bos_token, tokenizer.eos_token) == (1, 2, "<s>", "</s>")
    assert tokenizer.add_bos and tokenizer.pad_id is None
    assert tokenizer.stop_ids == [2, 1]  # eos, then generation_config's list [2, 1]
    assert tokenizer.vocab_size == 512
    assert tokenizer.special_tokens() == reference.special_tokens_map
    for text in [*TEXTS, "story<s>with</s>specials"]:
        expected = reference(text, return_offsets_mapping=True)
        ids, offsets = tokenizer.encode_with_offsets(text)
        assert ids == expected["input_ids"], text
        assert offsets == [tuple(o) for o in expected["offset_mapping"]], text
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert tokenizer.decode(ids, skip_special_tokens=False) == reference.decode(ids)


def test_no_double_bos_and_explicit_bos_eos(stories_dir):
    tokenizer = Tokenizer.from_checkpoint(stories_dir)
    plain = tokenizer.encode("Once upon a time")
    assert plain[0] == 1 and plain[1] != 1
    assert tokenizer.encode("<s>Once upon a time") == plain
    assert tokenizer.encode("Once upon a time", add_bos=False) == plain[1:]
    assert tokenizer.encode("Once upon a time", add_eos=True) == [*plain, 2]
    assert tokenizer.encode("") == [1]


def test_gpt_neox_tokenizer_json_round_trips_without_bos(data_dir):
    from transformers import PreTrainedTokenizerFast

    folder = data_dir / "tokenizers" / "gpt-neox-20b"
    reference = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    tokenizer = Tokenizer.from_checkpoint(folder)
    assert not tokenizer.add_bos and tokenizer.bos_id is None
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == reference(text)["input_ids"]
        assert tokenizer.decode(ids) == text  # byte-level BPE is lossless


def test_gpt2_vocab_and_merges_with_special_tokens_from_config(data_dir, tmp_path):
    from transformers import AutoTokenizer

    source = data_dir / "tokenizers" / "gpt2"
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(source / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "tokenizer_class": "GPT2Tokenizer"})
    )
    reference = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer = Tokenizer.from_checkpoint(tmp_path)
    assert tokenizer.eos_id == 50256 and tokenizer.stop_ids == [50256] and not tokenizer.add_bos
    for text in [*TEXTS, "end<|endoftext|>start"]:
        ids = tokenizer.encode(text)
        assert ids == reference(text)["input_ids"], text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.encode("a<|endoftext|>", add_eos=True)[-2:] == [50256, 50256]


def test_sentencepiece_model_matches_sentencepiece(data_dir):
    import sentencepiece

    folder = data_dir / "tokenizers" / "mistral-7b-v0.1"
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokenizer = Tokenizer.from_checkpoint(folder)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.bos_token, tokenizer.eos_token) == (1, 2, "<s>", "</s>")
    assert tokenizer.add_bos and tokenizer.vocab_size == 32000
    for text in TEXTS:
        ids, offsets = tokenizer.encode_with_offsets(text)
        assert ids == [1, *processor.encode(text)], text
        assert tokenizer.decode(ids) == processor.decode(ids)
        # Each id's span covers the characters its piece came from.
        for token_id, (start, end) in zip(ids[1:], offsets[1:]):
            piece = processor.id_to_piece(token_id).replace("▁", " ")
            if not piece.startswith("<0x"):
                assert text[start:end].strip() == piece.strip(), (text, piece)
    # Special token strings in the text (a rendered template) are single ids; the rest is encoded around them.
    ids = tokenizer.encode("<s>[INST] Hi [/INST] Hello</s>")
    assert ids == [1, *processor.encode("[INST] Hi [/INST] Hello"), 2]
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>[INST] Hi [/INST] Hello</s>"


def test_special_ids_come_from_config_files(stories_dir, tmp_path):
    shutil.copy(stories_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": False, "eos_token": "</s>", "pad_token": {"content": "<unk>"}})
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 9, "bos_token_id": 1}))
    tokenizer = Tokenizer.from_checkpoint(tmp_path)
    assert not tokenizer.add_bos
    assert tokenizer.encode("Once")[0] != 1
    assert tokenizer.stop_ids == [2, 7, 9]
    assert tokenizer.pad_id == 0
    assert (tokenizer.bos_id, tokenizer.bos_token) == (1, "<s>")  # from config.json's id


def test_chat_template_read_from_checkpoint_files(stories_dir, tmp_path):
    shutil.copy(stories_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
    )
    assert Tokenizer.from_checkpoint(tmp_path).chat_template == "D"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert Tokenizer.from_checkpoint(tmp_path).chat_template == "J"


def test_folder_without_tokenizer_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer found"):
        Tokenizer.from_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such folder"):
        Tokenizer.from_checkpoint(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_checkpoint(Path(tmp_path))
