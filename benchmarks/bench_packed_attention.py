"""Packed-row attention: FlashAttention-4's variable-length kernels, flex_attention with a block mask, and SDPA
with a dense (B, 1, T, T) mask.

A Llama-3.2-1B-shaped model (random bf16 weights, every parameter trained, each decoder block compiled) runs
forward and backward of `model.hidden_states` on rows packed with documents of random lengths, under:
  - flash4: the packed-row default on a Hopper GPU with the flash-attn-4 package: the documents laid end to end
            through its variable-length kernels (where the package is missing, the line says flex_attention ran);
  - flex:   the default without that package (FlashAttention-4 off; litft.models.common.FLEX_ATTENTION = "auto");
  - dense:  the same rows through SDPA with a boolean mask (FLEX_ATTENTION = "never");
  - causal: no document masking at all (FlashAttention-4's or SDPA's causal kernel): not a correct packed run, the
            reference speed of plain causal attention over the same tokens.
Tokens/s counts every token of the batch; peak memory is torch.cuda.max_memory_allocated over the timed steps.
Each line also says which kernel family actually ran (`attention`) and how much of the causal attention lies
within documents (`same_document_fraction`: the share of score tiles flex_attention cannot skip, roughly).

  python benchmarks/bench_packed_attention.py [--batch 8 --seq 2048 --min_document 64 --max_document 1024]

Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import DEVICE, SHAPES, hf_config, peak_memory_gib, synchronize

from litft.models import build_model, common, flash_attention

VARIANTS = ("flash4", "flex", "dense", "causal")


def packed_rows(
    batch: int, seq: int, min_document: int, max_document: int, vocab: int, seed: int
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Rows filled end to end with documents of random lengths (the last one of a row cut to fit): input ids,
    position ids restarting at each document and document ids 1, 2, ... as litft.data.collate makes them; and
    the documents' lengths."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    position_ids = torch.empty(batch, seq, dtype=torch.long)
    document_ids = torch.empty(batch, seq, dtype=torch.long)
    lengths: list[int] = []
    for row in range(batch):
        start, document = 0, 1
        while start < seq:
            length = int(torch.randint(min_document, max_document + 1, (1,), generator=generator))
            end = min(start + length, seq)
            position_ids[row, start:end] = torch.arange(end - start)
            document_ids[row, start:end] = document
            lengths.append(end - start)
            start, document = end, document + 1
    rows = {"input_ids": input_ids, "position_ids": position_ids, "document_ids": document_ids,
            "document_offsets": flash_attention.document_offsets(document_ids)}  # as collating finds them
    return {name: tensor.to(DEVICE) for name, tensor in rows.items()}, lengths


def same_document_fraction(lengths: list[int], batch: int, seq: int) -> float:
    """The share of causal (query, key) pairs that lie within one document: the work the document mask keeps."""
    kept = sum(n * (n + 1) // 2 for n in lengths)
    return kept / (batch * seq * (seq + 1) // 2)


def run_variant(model, rows: dict[str, torch.Tensor], variant: str, warmup: int, steps: int) -> dict:
    common.FLEX_ATTENTION = "never" if variant == "dense" else "auto"
    flash_attention.FLASH_ATTENTION_4 = "never" if variant in ("flex", "dense") else "auto"
    torch._dynamo.reset()  # the blocks hold whether FlashAttention-4 runs as a constant: compile them again
    document_ids = None if variant == "causal" else rows["document_ids"]
    device = rows["input_ids"].device
    flash4 = flash_attention.rows_apply(device, torch.bfloat16, model.config.head_dim)
    if document_ids is None:
        attention = "flash_attention_4" if flash4 else "sdpa"
    elif variant != "dense" and flash4:
        attention = "flash_attention_4_variable_length"
    else:
        attention = "flex_attention" if common.use_flex_attention(device) else "sdpa"

    def step() -> None:
        hidden = model.hidden_states(rows["input_ids"], rows["position_ids"], document_ids,
                                     document_offsets=rows["document_offsets"])  # (B, T, hidden)
        hidden.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):  # the first compiles the blocks for this variant's attention path
        step()
    synchronize()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    elapsed = time.perf_counter() - started
    batch, seq = rows["input_ids"].shape
    return {
        "attention": attention,
        "tokens_per_s": round(batch * seq * steps / elapsed),
        "step_ms": round(1000 * elapsed / steps, 1),
        "peak_mem_gib": peak_memory_gib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-1b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--min_document", type=int, default=64)
    parser.add_argument("--max_document", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--eager", action="store_true", help="do not compile the decoder blocks")
    args = parser.parse_args()

    shape = SHAPES[args.shape]
    torch.manual_seed(0)
    with torch.device(DEVICE):  # on CPU (a smoke test: --shape tiny) every variant runs SDPA
        model = build_model(hf_config(shape)).to(torch.bfloat16)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    model.tie_weights()
    if not args.eager:
        for block in model.blocks:
            block.compile()
    rows, lengths = packed_rows(args.batch, args.seq, args.min_document, args.max_document, shape["vocab"], seed=0)
    shared = {
        "shape": args.shape, "batch": args.batch, "seq": args.seq, "documents": len(lengths),
        "same_document_fraction": round(same_document_fraction(lengths, args.batch, args.seq), 3),
        "compile": not args.eager, "torch": torch.__version__,
    }
    for variant in args.variants.split(","):
        record = {"variant": variant, **shared}
        try:
            record.update(run_variant(model, rows, variant, args.warmup, args.steps))
        except (RuntimeError, ValueError) as error:  # out of memory, compile failures: report, run the next variant
            record["error"] = f"{type(error).__name__}: {str(error)[:400]}"
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
