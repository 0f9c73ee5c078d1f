"""Peak memory of one QLoRA training step against sequence length, for litft and for Unsloth, and the longest
sequence each fits on this GPU (batch 1, llama-8b geometry, each tool's memory-saving mode).

Memory grows linearly with the sequence once attention runs in a flash kernel (no T x T scores), so a few measured
points give the slope and the intercept; the longest sequence is where the fitted line meets the GPU's memory. A
probe at the predicted length then checks it (`--verify`). Timing every length up to the limit instead would take
minutes per point (attention FLOPs grow with T^2).

  python benchmarks/longest_sequence.py --peer litft   --seqs 8192,16384,32768 [--verify] [--mlp_tile_tokens 8192]
  python benchmarks/longest_sequence.py --peer unsloth --seqs 8192,16384,32768 [--verify]

litft's offloaded blocks keep some projection outputs for their recomputation, capped per block at a share of the
GPU (`litft.training.strategies.KEPT_OUTPUT_DEVICE_SHARE`, 1%): below the cap that memory grows with the sequence,
above it it is constant, so a line through short sequences would overstate the slope. The points are measured with
keeping off and the cap is added to every prediction, as an upper bound; `--verify` runs with keeping on.

Needs .bench/peers.py (a copy of ../shared/bench/peers.py) for the Unsloth side. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / ".bench"))

from bench import SHAPES, TARGETS, random_checkpoint  # noqa: E402

GIB = 2**30


def litft_step_factory(checkpoint: Path, longest: int, mlp_tile_tokens: int | None = None):
    from litft.adapters.lora import LoRAConfig
    from litft.commands.finetune import load_for_training
    from litft.training.loss import CausalLMObjective
    from litft.training.strategies import enable_activation_checkpointing
    from litft.training.tiling import enable_tiled_mlp

    lora = LoRAConfig(rank=16, alpha=32, dropout=0.0, targets=TARGETS)
    model = load_for_training("qlora", checkpoint, torch.bfloat16, torch.device("cuda"), lora, "bnb.nf4")
    if mlp_tile_tokens is not None:
        enable_tiled_mlp(model, mlp_tile_tokens)
    enable_activation_checkpointing(model, offload=True)
    objective = CausalLMObjective(model)
    vocab = SHAPES["llama-8b"]["vocab"]

    def step(seq: int) -> None:
        tokens = torch.randint(0, vocab, (1, seq), device="cuda")
        targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], dim=1)
        objective(tokens, targets).backward()
        model.zero_grad(set_to_none=True)

    return step


def unsloth_step_factory(checkpoint: Path, longest: int):
    import peers  # the shared peers' benchmark: its own Unsloth loading code

    arguments = SimpleNamespace(task="qlora", seq=longest, prompt=0, new=0)
    FastLanguageModel, model = peers.unsloth_model(arguments, str(checkpoint))
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0, bias="none", target_modules=peers.TARGETS, random_state=0,
        use_gradient_checkpointing="unsloth",
    )
    FastLanguageModel.for_training(model)
    vocab = SHAPES["llama-8b"]["vocab"]

    def step(seq: int) -> None:
        tokens = torch.randint(0, vocab, (1, seq), device="cuda")
        model(input_ids=tokens, labels=tokens).loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def peak_of(step, seq: int) -> float | None:
    """Peak GiB of one forward+backward at `seq` tokens, or None when it does not fit."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        step(seq)
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        return None
    return torch.cuda.max_memory_allocated() / GIB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer", choices=["litft", "unsloth"], required=True)
    parser.add_argument("--seqs", default="8192,16384,32768")
    parser.add_argument("--verify", action="store_true", help="run one step at 95%% of the predicted longest length")
    parser.add_argument("--checkpoint_dir", default="/tmp/peers-hf-checkpoint-llama-8b")
    parser.add_argument("--mlp_tile_tokens", type=int, default=None,
                        help="litft: run each block's MLP on tiles of this many tokens (default: untiled)")
    args = parser.parse_args()
    if args.mlp_tile_tokens is not None and args.peer != "litft":
        parser.error("--mlp_tile_tokens applies to --peer litft only")
    seqs = [int(s) for s in args.seqs.split(",")]
    record: dict = dict(peer=args.peer, task="longest-sequence", shape="llama-8b", batch=1)
    if args.peer == "litft":
        record["mlp_tile_tokens"] = args.mlp_tile_tokens
    try:
        checkpoint = Path(args.checkpoint_dir)
        if args.peer == "unsloth":
            import peers

            peers.saved_checkpoint(peers.SHAPES["llama-8b"], str(checkpoint))
        else:
            random_checkpoint("llama-8b", checkpoint)
        if args.peer == "litft":
            step = litft_step_factory(checkpoint, 4 * max(seqs), args.mlp_tile_tokens)
        else:
            step = unsloth_step_factory(checkpoint, 4 * max(seqs))
        capacity = torch.cuda.get_device_properties(0).total_memory / GIB
        kept_cap = 0.0
        if args.peer == "litft":
            from litft.training import strategies

            widening, strategies.KEPT_OUTPUT_WIDENING = strategies.KEPT_OUTPUT_WIDENING, 0.0
            kept_cap = strategies.KEPT_OUTPUT_DEVICE_SHARE * capacity
            record["kept_outputs_cap_gib"] = round(kept_cap, 2)
        peak_of(step, 1024)  # warm-up: kernels, workspaces
        points = {seq: peak_of(step, seq) for seq in seqs}
        record["peak_gib"] = {str(seq): (round(peak, 2) if peak else None) for seq, peak in points.items()}
        fitted = [(seq, peak) for seq, peak in points.items() if peak is not None]
        if len(fitted) >= 2:
            (s0, p0), (s1, p1) = fitted[0], fitted[-1]
            slope = (p1 - p0) / (s1 - s0)  # GiB per token
            longest = int(s1 + (capacity * 0.97 - kept_cap - p1) / slope)
            record.update(gib_per_1k_tokens=round(slope * 1024, 4), intercept_gib=round(p0 - slope * s0, 2),
                          predicted_longest=longest)
            if args.verify:
                if args.peer == "litft":
                    strategies.KEPT_OUTPUT_WIDENING = widening
                probe = int(longest * 0.95) // 1024 * 1024
                peak = peak_of(step, probe)
                record["verified"] = {str(probe): round(peak, 2) if peak else "out of memory"}
    except Exception as error:  # report, so the rest of the benchmark command still runs
        record["error"] = f"{type(error).__name__}: {str(error)[:400]}"
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
