"""litft's multi-GPU benchmark: the same training step as `bench.py`, under DDP or FSDP2 on N GPUs of one host,
through litft's own strategy code (`make_fabric`, `load_for_strategy`, `setup_for_strategy`).

  python benchmarks/bench_distributed.py --devices 2 --strategy ddp  --task lora  --shape llama-8b --batch 4
  python benchmarks/bench_distributed.py --devices 2 --strategy fsdp --task qlora --shape llama-8b --batch 4 --ckpt
  python benchmarks/bench_distributed.py --devices 4 --strategy fsdp --task full  --shape llama-1b --batch 4

`--task full` trains every weight (bf16 weights and AdamW state, the `--precision bf16-true` path).

`--batch` is per GPU. Prints one JSON line from rank 0: tokens/s in all and per GPU, peak memory per GPU (max over
ranks). Fabric starts the other ranks itself.
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

from bench import (  # noqa: E402
    DEVICE, SHAPES, TARGETS, flops_per_token, parameter_count, peak_memory_gib, random_batch, random_checkpoint, synchronize,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--task", choices=["lora", "qlora", "full"], default="lora")
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-8b")
    parser.add_argument("--batch", type=int, default=4, help="rows per GPU")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro_batch", type=int, default=None, help="rows per forward pass (accumulate to --batch)")
    parser.add_argument("--ckpt", action="store_true")
    parser.add_argument("--offload", action="store_true", help="with --ckpt: saved block inputs in host memory")
    parser.add_argument("--ckpt_blocks", type=int, default=None, help="with --ckpt: checkpoint only the first N blocks")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--experts_one_by_one", action="store_true",
                        help="a mixture's experts one by one (the A/B of its grouped GEMMs; under FSDP2 these read "
                             "the gathered expert weights copied together)")
    parser.add_argument("--profile", action="store_true", help="print rank 0's kernel profile of one more step (stderr)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--checkpoint_dir", default="/tmp/peers-hf-checkpoint")
    args = parser.parse_args()

    from litft.adapters.lora import LoRAConfig
    from litft.commands.finetune import load_for_strategy, setup_for_strategy
    from litft.training.config import TrainConfig
    from litft.training.loop import train_step
    from litft.training.loss import CausalLMObjective
    from litft.training.objectives import SupervisedObjective
    from litft.training.optim import make_optimizer
    from litft.training.strategies import enable_activation_checkpointing, make_fabric

    if args.experts_one_by_one:
        from litft.adapters import lora_experts

        lora_experts.ENABLED = False
    shape = SHAPES[args.shape]
    fabric = make_fabric(accelerator=DEVICE, devices=args.devices, strategy=args.strategy, precision="32-true")
    fabric.launch()
    folder = Path(f"{args.checkpoint_dir}-{args.shape}")
    if fabric.global_rank == 0:
        random_checkpoint(args.shape, folder)
    fabric.barrier()
    lora = LoRAConfig(rank=16, alpha=32, dropout=0.0, targets=TARGETS) if args.task != "full" else None
    model = load_for_strategy(fabric, args.task, folder, torch.bfloat16, lora, "bnb.nf4" if args.task == "qlora" else None)
    if args.ckpt:
        enable_activation_checkpointing(model, offload=args.offload, blocks=args.ckpt_blocks)
    if args.compile:
        from litft.training.compilation import compile_blocks

        compile_blocks(model, "torch")  # litft's own compile path: per block, its partitioner settings, offloading
    wrapped = setup_for_strategy(fabric, CausalLMObjective(model))
    per_step = args.batch * args.devices
    micro_batch = args.micro_batch or args.batch
    config = TrainConfig(global_batch_size=per_step, micro_batch_size=micro_batch, max_norm=None, lr=1e-4)
    optimizer = fabric.setup_optimizers(make_optimizer(wrapped, config))
    micro_batches = [
        random_batch(micro_batch, args.seq, shape["vocab"], fabric.device, seed=fabric.global_rank * 100 + index)
        for index in range(args.batch // micro_batch)
    ]
    objective = SupervisedObjective(pad_id=0)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            synchronize()
            fabric.barrier()
            started = time.perf_counter()
        train_step(fabric, wrapped, optimizer, objective, micro_batches, config)
    synchronize()
    fabric.barrier()
    seconds = time.perf_counter() - started
    if args.profile:  # every rank runs the step (its collectives); rank 0 records it
        import contextlib

        from torch.profiler import ProfilerActivity, profile

        from bench import print_profile_summary

        recording = fabric.global_rank == 0
        context = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) if recording else contextlib.nullcontext()
        with context as profiler:
            train_step(fabric, wrapped, optimizer, objective, micro_batches, config)
            synchronize()
        if recording:
            print(profiler.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90),
                  file=sys.stderr)
            print_profile_summary(profiler, 1)
    total = per_step * args.seq * args.steps / seconds
    peak = fabric.all_reduce(torch.tensor(peak_memory_gib(), device=fabric.device), reduce_op="max")
    if fabric.global_rank == 0:
        recomputed = (args.ckpt_blocks if args.ckpt_blocks is not None else shape["layers"]) / shape["layers"] if args.ckpt else 0
        matrix_flops = flops_per_token(shape, args.seq, False) + 2 * parameter_count(shape) * (recomputed + (args.task == "full"))
        mfu = total / args.devices * matrix_flops / (790.0 * 1e12)
        print(json.dumps(dict(
            peer="litft", task=args.task, shape=args.shape, strategy=args.strategy, devices=args.devices,
            batch_per_gpu=args.batch, micro_batch=micro_batch, seq=args.seq, ckpt=args.ckpt, ckpt_blocks=args.ckpt_blocks, offload=args.offload,
            compile=args.compile, experts_one_by_one=args.experts_one_by_one,
            tokens_per_s=round(total), tokens_per_s_per_gpu=round(total / args.devices), mfu=round(mfu, 3),
            peak_mem_gib_per_gpu=round(float(peak), 2),
        )), flush=True)


if __name__ == "__main__":
    main()
