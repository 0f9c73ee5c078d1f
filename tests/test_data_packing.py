"""Packing: a packed row computes exactly what its documents compute alone, and the loss does not change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from litft.chat_templates import resolve_chat_template
from litft.checkpoint import load_model
from litft.data import DataConfig, IGNORE_INDEX, collate, load_datasets, make_rows
from litft.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def samples(stories_dir, data_dir, tmp_path_factory):
    tokenizer = Tokenizer.from_checkpoint(stories_dir)
    config = DataConfig(path=str(data_dir / "chat" / "identity_500.sharegpt.json"), limit=24, max_seq_length=128,
                        cache_dir=str(tmp_path_factory.mktemp("cache")))
    train, _ = load_datasets(config, tokenizer, resolve_chat_template(tokenizer, "plain"), log=lambda line: None)
    return train


def summed_loss(model, batch) -> torch.Tensor:
    logits = model(batch["input_ids"], batch["position_ids"], batch["document_ids"])
    return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def test_packed_rows_match_documents_run_alone(tiny_llama_dir, samples):
    model = load_model(tiny_llama_dir, dtype=torch.float32, device="cpu").eval()
    rows = make_rows(samples, max_seq_length=256, pack=True, seed=0)
    assert len(rows) < len(samples) and max(len(row) for row in rows) > 1
    batch = collate(rows, pad_id=0, pad_to_multiple_of=8)
    with torch.no_grad():
        packed_logits = model(batch["input_ids"], batch["position_ids"], batch["document_ids"])
        for b, row in enumerate(rows):
            start = 0
            for sample in row:
                end = start + len(sample["input_ids"])
                alone = model(sample["input_ids"][None])[0]
                torch.testing.assert_close(packed_logits[b, start:end], alone, atol=1e-5, rtol=0)
                start = end

        unpacked = collate(make_rows(samples, 128, pack=False, seed=0), pad_id=0)
        assert unpacked["document_ids"] is None
        packed_loss, unpacked_loss = summed_loss(model, batch), summed_loss(model, unpacked)
        alone_loss = sum(summed_loss(model, collate([[sample]])) for sample in samples)
    torch.testing.assert_close(packed_loss, unpacked_loss, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(packed_loss, alone_loss, atol=1e-3, rtol=1e-5)
    trained = sum(int((sample["targets"] != IGNORE_INDEX).sum()) for sample in samples)
    assert int((batch["targets"] != IGNORE_INDEX).sum()) == trained == int((unpacked["targets"] != IGNORE_INDEX).sum())


def test_make_rows_packs_every_sample_once_within_the_limit(samples):
    rows = make_rows(samples, max_seq_length=256, pack=True, seed=3)
    placed = [id(sample) for row in rows for sample in row]
    assert sorted(placed) == sorted(id(sample) for sample in samples)
    assert all(sum(len(s["input_ids"]) for s in row) <= 256 for row in rows)
    # Best-fit decreasing needs no more rows than the total length strictly requires, plus a little slack.
    total = sum(len(s["input_ids"]) for s in samples)
    assert len(rows) <= -(-total // 256) + 1
    again = make_rows(samples, max_seq_length=256, pack=True, seed=3)
    assert [[id(s) for s in row] for row in again] == [[id(s) for s in row] for row in rows]
    assert make_rows(samples, 128, pack=False, seed=3) == [[sample] for sample in samples]
    with pytest.raises(ValueError, match="does not fit"):
        make_rows(samples, max_seq_length=8, pack=True, seed=3)


def test_collate_positions_documents_and_padding():
    eos = 2
    first = {"input_ids": torch.tensor([1, 5, 6]), "targets": torch.tensor([IGNORE_INDEX, 6, eos])}
    second = {"input_ids": torch.tensor([1, 7]), "targets": torch.tensor([7, eos])}
    # Padding with the EOS id: the trained EOS targets stay, the padding is never a target.
    batch = collate([[first, second], [second]], pad_id=eos, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7, eos, eos, eos], [1, 7, eos, eos, eos, eos, eos, eos]]
    assert batch["targets"].tolist() == [
        [IGNORE_INDEX, 6, eos, 7, eos, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
        [7, eos] + [IGNORE_INDEX] * 6,
    ]
    assert batch["position_ids"][0, :5].tolist() == [0, 1, 2, 0, 1]
    assert batch["position_ids"][1, :2].tolist() == [0, 1]
    assert batch["document_ids"].tolist() == [[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]

    single = collate([[first], [second]], pad_id=0)
    assert single["document_ids"] is None
    assert single["input_ids"].shape == (2, 3) and single["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
