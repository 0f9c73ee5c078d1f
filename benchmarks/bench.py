"""litft's side of the side-by-side GPU benchmark (the peers' side is `peers.py` from the shared bench folder).

It runs litft's real code path: the checkpoint loader (4-bit quantization as weights load for QLoRA), the LoRA
layers, the Fabric set-up, the chunked fused cross-entropy, the optimizer and `litft.training.loop.train_step`;
for decoding, `litft.generation.generate`. Same protocol as the peers: Llama-3.2-1B / Llama-3.1-8B geometry, random
weights and tokens, LoRA rank 16 / alpha 32 / dropout 0 on q,k,v,o,gate,up,down, bf16 base, fused AdamW, 3 warm-up
and 8 timed steps, tokens/s = batch * seq * steps / time, peak = torch.cuda.max_memory_allocated.

  python benchmarks/bench.py --task lora --shape llama-8b --batch 4 --seq 2048 [--ckpt] [--compile]
  python benchmarks/bench.py --task qlora --shape llama-8b --batch 4 --seq 2048
  python benchmarks/bench.py --task qlora --quantize fp8 --shape llama-8b --batch 4 --seq 2048   # float8 base GEMMs
  python benchmarks/bench.py --task decode --shape llama-8b --prompt 128 --new 256
  python benchmarks/bench.py --task dpo --shape llama-1b --batch 4 --seq 1024   # batch = pairs (2x sequences)

Prints one JSON line (peer "litft"), like peers.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # the geometry of Llama-3.2-1B and Llama-3.1-8B, as in peers.py
    "llama-1b": dict(vocab=128256, hidden=2048, layers=16, heads=32, kv=8, inter=8192, tied=True),
    "llama-8b": dict(vocab=128256, hidden=4096, layers=32, heads=32, kv=8, inter=14336, tied=False),
    "tiny": dict(vocab=512, hidden=64, layers=2, heads=4, kv=2, inter=128, tied=False),  # a CPU smoke test
    # Qwen3-30B-A3B's geometry (128 experts of 768, 8 per token, heads of 128) on 12 of its 48 layers: 8.1B
    # parameters, 16 GB in bf16, so the random checkpoint fits a device call's disk and time.
    "qwen3-moe": dict(vocab=151936, hidden=2048, layers=12, heads=32, kv=4, head_dim=128, inter=6144, tied=False,
                      experts=128, experts_per_token=8, expert_inter=768),
    "tiny-moe": dict(vocab=512, hidden=64, layers=2, heads=4, kv=2, head_dim=16, inter=128, tied=False, experts=4,
                     experts_per_token=2, expert_inter=32),  # a CPU smoke test of the mixture's path
    # Gemma 2 2B and Gemma 3 1B: heads of 256, sliding windows on alternate layers (Gemma 2, which also soft-caps
    # its scores) or five layers in six (Gemma 3). litft's own A/B of attention paths (`--attention`): the shared
    # peers' script has Llama geometry only.
    "gemma2-2b": dict(vocab=256000, hidden=2304, layers=26, heads=8, kv=4, head_dim=256, inter=9216, tied=True,
                      gemma="gemma2", window=4096, softcap=50.0, final_softcap=30.0),
    "gemma3-1b": dict(vocab=262144, hidden=1152, layers=26, heads=4, kv=1, head_dim=256, inter=6912, tied=True,
                      gemma="gemma3_text", window=512),
    "tiny-gemma2": dict(vocab=512, hidden=64, layers=2, heads=4, kv=2, head_dim=16, inter=128, tied=True,
                        gemma="gemma2", window=8, softcap=50.0, final_softcap=30.0),  # a CPU smoke test
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else 0.0
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
PEAK_TFLOPS = 790.0


def hf_config(shape: dict) -> dict:
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": shape["vocab"],
        "hidden_size": shape["hidden"], "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv"], "intermediate_size": shape["inter"], "max_position_embeddings": 8192,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": shape["tied"], "torch_dtype": "bfloat16",
        "bos_token_id": 2, "eos_token_id": 3,
    }
    if "gemma" in shape:
        config.update(
            model_type=shape["gemma"], architectures=["Gemma2ForCausalLM" if shape["gemma"] == "gemma2" else
                                                      "Gemma3ForCausalLM"],
            head_dim=shape["head_dim"], query_pre_attn_scalar=shape["head_dim"], sliding_window=shape["window"],
            hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
            attn_logit_softcapping=shape.get("softcap"), final_logit_softcapping=shape.get("final_softcap"),
        )
        if shape["gemma"] == "gemma3_text":
            config.update(rope_theta=1_000_000.0, rope_local_base_freq=10000.0, sliding_window_pattern=6)
    if "experts" in shape:
        config.update(
            model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], head_dim=shape["head_dim"],
            num_experts=shape["experts"], num_experts_per_tok=shape["experts_per_token"],
            moe_intermediate_size=shape["expert_inter"], norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        )
    return config


def attention_width(shape: dict) -> int:
    return shape["heads"] * shape.get("head_dim", shape["hidden"] // shape["heads"])


def parameter_count(shape: dict) -> int:
    """Parameters a token computes with: for a mixture of experts, its chosen experts' and not the others'."""
    embed = shape["vocab"] * shape["hidden"] * (1 if shape["tied"] else 2)
    h, kv, heads, width = shape["hidden"], shape["kv"], shape["heads"], attention_width(shape)
    mlp_width = shape["experts_per_token"] * shape["expert_inter"] if "experts" in shape else shape["inter"]
    per_layer = 2 * h * width + 2 * h * width * kv // heads + 3 * h * mlp_width
    return embed + shape["layers"] * per_layer


def flops_per_token(shape: dict, seq: int, recompute: bool) -> float:
    attention = 4 * shape["layers"] * seq * attention_width(shape)
    return (6 if recompute else 4) * parameter_count(shape) + 3 * attention


def random_checkpoint(shape_name: str, folder: Path) -> Path:
    """A random bf16 checkpoint in Hugging Face layout written by litft's own writer (reused when present, e.g.
    the one peers.py saved: same layout, same names)."""
    if (folder / "config.json").exists():
        return folder
    from litft.checkpoint import write_hf_checkpoint
    from litft.models import build_model

    config = hf_config(SHAPES[shape_name])
    with torch.device(DEVICE):
        model = build_model(config).to(torch.bfloat16)
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    folder.mkdir(parents=True, exist_ok=True)
    write_hf_checkpoint(folder, model.state_dict(), config)
    del model
    return folder


def random_batch(rows: int, seq: int, vocab: int, device: torch.device, seed: int) -> dict:
    """A training batch of random tokens, every position trained but the last (as the peers' labels=inputs)."""
    from litft.training.loss import find_trained_positions

    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, seq), generator=generator)
    targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], dim=1)
    # As SupervisedObjective.collate builds a batch: the trained positions found on the host.
    return {"input_ids": tokens.to(device), "targets": targets.to(device), "position_ids": None,
            "document_ids": None, "num_tokens": tokens.numel(),
            "trained_positions": find_trained_positions(targets).to(device)}


def sample(batch: dict, row: int) -> dict:
    """Row `row` of a random batch as a dataset sample (input ids and shifted targets)."""
    return {"input_ids": batch["input_ids"][row], "targets": batch["targets"][row]}


def bench_training(args) -> dict:
    from litft.adapters import lora_gemm
    from litft.adapters.lora import LoRAConfig, set_compute_together
    from litft.commands.finetune import load_for_training
    from litft.training.config import TrainConfig
    from litft.training.loop import to_device, train_step
    from litft.training.loss import CausalLMObjective
    from litft.training.objectives import SupervisedObjective
    from litft.training.optim import make_optimizer
    from litft.training.strategies import enable_activation_checkpointing, make_fabric
    from litft.training.tiling import enable_tiled_mlp

    shape = SHAPES[args.shape]
    checkpoint = random_checkpoint(args.shape, Path(args.checkpoint_dir or f"{args.hf_dir}-{args.shape}"))
    fabric = make_fabric(accelerator=DEVICE, devices=1, precision="32-true")
    lora = LoRAConfig(rank=16, alpha=32, dropout=args.lora_dropout, targets=TARGETS)
    method = "lora" if args.task == "dpo" else args.task
    model = load_for_training(method, checkpoint, torch.bfloat16, fabric.device, lora,
                              args.quantize if args.task == "qlora" else None)
    if args.bnb_dequantize:  # the A/B of litft.adapters.nf4_dequantize: bitsandbytes' dequantization instead
        from litft.adapters import quantization

        quantization.use_nf4_kernel = False
    if args.lora_one_by_one:  # the A/B of litft.adapters.lora_projections: each LoRA layer on its own
        set_compute_together(model, False)
    if args.gated_product_apart:  # the A/B of litft.adapters.lora_gated_down: act(gate) * up as written
        from litft.adapters import lora_gated_down

        lora_gated_down.ENABLED = False
    if args.product_after_gate_up:  # the A/B of lora_gemm.gated_projections: h by the elementwise kernel
        from litft.adapters import lora_gated_down

        lora_gated_down.FUSED_PRODUCT = False
    if args.adapter_gradients_apart:  # the A/B of litft.adapters.adapter_gradients: two GEMMs reading dy each
        from litft.adapters import lora_projections

        lora_projections.FUSED_ADAPTER_GRADIENTS = False
    if args.adapters_cast_per_operator:  # the A/B of litft.adapters.adapter_copies: each operator casts its own
        from litft.adapters import adapter_copies

        adapter_copies.ENABLED = False
    if args.experts_elementwise_eager:  # the A/B of the experts' elementwise work compiled under --compile
        from litft.adapters import lora_experts

        lora_experts.COMPILED_ELEMENTWISE = False
    if args.rotary_as_written:  # the A/B of litft.models.rotary_heads: autograd's backward of split and rotate
        from litft.models import rotary_heads

        rotary_heads.ENABLED = False
    if args.lora_gemm_group_rows is not None:  # the LoRA GEMM kernel's tile order
        lora_gemm.GROUP_ROWS = args.lora_gemm_group_rows
    if args.no_warp_specialized:  # the A/B of litft.adapters.lora_gemm_pingpong
        lora_gemm.warp_specialized_enabled = False
    if args.no_activation_backward_epilogue:  # the A/B of lora_gemm.gated_input_gradient
        lora_gemm.activation_backward_enabled = False
    if args.nf4_per_byte:  # the A/B of nf4_dequantize's per-block kernel
        from litft.adapters import nf4_dequantize

        nf4_dequantize.PER_BLOCK = False
    if args.attention is not None:  # the A/B of litft.models.flash_attention
        from litft.models import flash_attention

        flash_attention.FLASH_ATTENTION_4 = {"sdpa": "never", "flash4": "always", "auto": "auto"}[args.attention]
    if args.adapter_gradients_smallest_columns is not None:  # which widths take that kernel on the GPU
        from litft.adapters import adapter_gradients

        adapter_gradients.SMALLEST_KERNEL_COLUMNS = args.adapter_gradients_smallest_columns
    if args.separate_base_gemms:  # the A/B of join_frozen_weights: q/k/v as before, one base GEMM each
        from litft.adapters.lora import lora_modules

        for layer in lora_modules(model).values():
            layer.joined_base = False
            if layer.quantization is None:
                layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    if args.mlp_tile_tokens is not None:
        enable_tiled_mlp(model, args.mlp_tile_tokens)
    if args.ckpt:
        from litft.training import strategies

        if args.kept_output_widening is not None:  # the A/B of keeping projection outputs (0: recompute them all)
            strategies.KEPT_OUTPUT_WIDENING = args.kept_output_widening
        enable_activation_checkpointing(model, offload=args.offload, blocks=args.ckpt_blocks)
    if args.compile:
        from litft.training import compilation

        if args.thunder_fusion == "none":
            compilation.THUNDER_FUSION_EXECUTOR = None
        # litft's own compile path: per block, its partitioner settings, offloading
        compilation.compile_blocks(model, args.compiler)
    wrapped = fabric.setup_module(CausalLMObjective(model))
    train_config = TrainConfig(global_batch_size=args.batch, micro_batch_size=args.batch, max_norm=None, lr=1e-4)
    optimizer = fabric.setup_optimizers(make_optimizer(wrapped, train_config))
    if args.task == "dpo":
        # The real preference path: chosen and rejected in one batch, the reference = adapters switched off.
        from litft.training.preference import DPOConfig, PreferenceObjective, base_model_reference

        objective = PreferenceObjective(DPOConfig(), pad_id=0, reference=base_model_reference)
        pairs = random_batch(2 * args.batch, args.seq, shape["vocab"], torch.device("cpu"), seed=0)
        rows = [{"chosen": sample(pairs, i), "rejected": sample(pairs, args.batch + i)} for i in range(args.batch)]
        batch = to_device(objective.collate(rows), fabric.device)
        sequences_per_step = 2 * args.batch
    else:
        objective = SupervisedObjective(pad_id=0)
        batch = random_batch(args.batch, args.seq, shape["vocab"], fabric.device, seed=0)
        sequences_per_step = args.batch
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]

    def step():
        return train_step(fabric, wrapped, optimizer, objective, [batch], train_config)

    if args.cuda_graph:
        step = whole_step_graph(step, optimizer)
    pending = None
    idle_events = []
    for index in range(args.warmup + args.steps):
        if index == args.warmup:
            synchronize()
            energy_before = energy_counter_mj()
            started = time.perf_counter()
        if args.idle_ms_per_step:  # an experiment: does idle time cost its length under the power limit?
            idle_events.append(idle_gpu(args.idle_ms_per_step) if index >= args.warmup else None)
        metrics = step()
        # Read as litft.training.loop.fit reads them: after the next step is queued (--sync_each_step: at once).
        if args.sync_each_step:
            metrics.resolve()
        elif pending is not None:
            pending.resolve()
        pending = metrics
    last_loss = pending.resolve()["loss"]
    synchronize()
    elapsed = time.perf_counter() - started
    energy_after = energy_counter_mj()
    tokens_per_second = sequences_per_step * args.seq * args.steps / elapsed
    # At the GPU's power limit a step's time is its energy over the limit: joules per step compare changes across
    # hosts whose clocks differ (NOTES.md, section 18).
    energy = {} if energy_before is None else dict(
        joules_per_step=round((energy_after - energy_before) / 1e3 / args.steps, 2),
        watts=round((energy_after - energy_before) / 1e3 / elapsed))
    # Graphs compiled by the steps: 2 per kind of block (4 with offloaded checkpointing) and the loss. Many more
    # means blocks recompiled, and past dynamo's limit ran eagerly (session 6: 14% slower with every test green).
    compiled_graphs = counters["stats"]["unique_graphs"] - graphs_before
    idle = {}
    if args.idle_ms_per_step:
        timed = [begin.elapsed_time(end) for begin, end in filter(None, idle_events)]
        idle = dict(idle_ms_per_step=args.idle_ms_per_step, idle_ms_measured=round(sum(timed) / len(timed), 2))
    if args.profile:
        profile_steps(lambda: step().resolve(), kernel_trace=args.kernel_trace)
    # DPO's reference forward (adapters off) costs one more forward pass, as recomputation does.
    mfu = tokens_per_second * flops_per_token(shape, args.seq, args.ckpt or args.task == "dpo") / (PEAK_TFLOPS * 1e12)
    return dict(batch=args.batch, seq=args.seq, ckpt=args.ckpt, offload=args.offload, compile=args.compile,
                compiler=args.compiler if args.compile else None,
                **({"thunder_fusion": args.thunder_fusion} if args.compile and args.compiler == "thunder" else {}),
                mlp_tile_tokens=args.mlp_tile_tokens,
                **({"kept_output_widening": strategies.KEPT_OUTPUT_WIDENING} if args.ckpt and args.offload else {}),
                **({"lora_dropout": args.lora_dropout} if args.lora_dropout else {}),
                lora_one_by_one=args.lora_one_by_one, bnb_dequantize=args.bnb_dequantize,
                separate_base_gemms=args.separate_base_gemms, gated_product_apart=args.gated_product_apart,
                product_after_gate_up=args.product_after_gate_up,
                adapter_gradients_apart=args.adapter_gradients_apart,
                adapters_cast_per_operator=args.adapters_cast_per_operator,
                adapter_gradients_smallest_columns=args.adapter_gradients_smallest_columns,
                rotary_as_written=args.rotary_as_written, experts_one_by_one=args.experts_one_by_one,
                experts_elementwise_eager=args.experts_elementwise_eager,
                lora_gemm_group_rows=args.lora_gemm_group_rows, no_warp_specialized=args.no_warp_specialized,
                no_activation_backward_epilogue=args.no_activation_backward_epilogue, nf4_per_byte=args.nf4_per_byte,
                attention=attention_kernel(),
                sync_each_step=args.sync_each_step,
                cuda_graph=args.cuda_graph, **idle,
                compiled_graphs=compiled_graphs, tokens_per_s=round(tokens_per_second), mfu=round(mfu, 3), **energy,
                last_loss=round(last_loss, 6),
                **({"lora_gemm_choices": lora_gemm.choices()} if lora_gemm.choices() else {}))


def attention_kernel() -> str:
    """Which kernels the step's causal attention ran: FlashAttention-4's (given windows and caps too: "+windows") or
    SDPA's."""
    from litft.models import flash_attention

    device = torch.device("cuda", torch.cuda.current_device()) if DEVICE == "cuda" else torch.device(DEVICE)
    if not flash_attention.check_setting(device):
        return "sdpa"
    return "flash4+windows" if flash_attention.WINDOWS == "on" else "flash4"


def idle_gpu(milliseconds: float) -> tuple:
    """An experiment, not a litft feature: the GPU spins one thread for about `milliseconds` (its other
    multiprocessors idle) before the next step is queued; returns the events around it, to read how long it took at
    the clock the step left behind (the sleep counts clock cycles)."""
    global _CYCLES_PER_MS
    if _CYCLES_PER_MS is None:  # calibrated once, at whatever clock the GPU then runs
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        torch.cuda._sleep(10**7)
        end.record()
        end.synchronize()
        _CYCLES_PER_MS = 10**7 / begin.elapsed_time(end)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    torch.cuda._sleep(int(milliseconds * _CYCLES_PER_MS))
    end.record()
    return begin, end


_CYCLES_PER_MS = None


def energy_counter_mj() -> int | None:
    """The GPU's energy counter since its driver loaded, in millijoules (NVML), or None without a GPU or NVML."""
    if DEVICE != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        # NVML counts every GPU of the host; torch maps the visible device to its index (CUDA_VISIBLE_DEVICES).
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda._get_nvml_device_index(torch.cuda.current_device()))
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception:  # no NVML bindings, or a GPU without the counter
        return None


def whole_step_graph(step, optimizer):
    """An experiment, not a litft feature: the whole training step (forward, backward, optimizer) captured once in a
    CUDA graph and replayed, to measure what launching kernels from the host costs. Needs fixed shapes, a step
    without host reads, and an optimizer whose step counter lives on the GPU."""
    for group in optimizer.param_groups:
        group["capturable"] = True
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step().resolve()  # compiled and allocated outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    def replay():
        graph.replay()
        return captured  # its tensors are the graph's outputs, rewritten by each replay

    return replay


KERNEL_CATEGORIES = (  # (category, substrings of kernel names), first match wins
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    # The last two: lora_gemm's kernels.
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "gemv", "sm90_", "splitk", "sum_of_products", "gated_projections")),
    ("triton (fused elementwise, loss)", ("triton",)),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("copy", ("copy", "memcpy", "memset", "cat", "fill")),
    ("other elementwise / reductions", ("",)),
)


def profile_steps(step, count: int = 2, kernel_trace: str | None = None) -> None:
    """Prints the kernels that take the GPU's time over `count` steps, to stderr (for the notes, not the table):
    the top kernels, the time per kernel category, and every GEMM shape with its rate; `kernel_trace`: a file for
    one step's kernels in launch order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as profiler:
        for _ in range(count):
            step()
        synchronize()
    print(profiler.key_averages().table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=90),
          file=sys.stderr)
    try:
        print_profile_summary(profiler, count)
        print_idle_gaps(step, count, kernel_trace)
    except Exception as error:  # the summary is a reading aid; the table above is already printed
        print(f"profile summary failed: {error!r}", file=sys.stderr)


def print_idle_gaps(step, count: int, kernel_trace: str | None = None) -> None:
    """Where the GPU waits for the host: the gaps between consecutive kernels over `count` steps, traced with the
    device activity alone (tracing host operators would itself slow the host down and widen the gaps)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(count):
            step()
        synchronize()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    kernels = sorted(
        (event["ts"], event["ts"] + event["dur"], event["name"])
        for event in events
        if event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in event
    )
    if kernel_trace:  # one step's kernels in launch order, for reading a layer's sequence off the GPU
        with open(kernel_trace, "w") as file:
            for start, end, name in kernels[: len(kernels) // count]:
                file.write(json.dumps(dict(start=round(start - kernels[0][0], 1), us=round(end - start, 1),
                                           name=name[:120])) + "\n")
    gaps = []
    busy_until, previous = kernels[0][1], kernels[0][2]
    for start, end, name in kernels[1:]:
        if start > busy_until:
            gaps.append((start - busy_until, previous, name))
        if end > busy_until:
            busy_until, previous = end, name
    span = busy_until - kernels[0][0]
    idle = sum(gap for gap, _, _ in gaps)
    print(f"GPU idle between kernels: {idle / count / 1e3:.1f} ms per step of {span / count / 1e3:.1f} ms "
          f"({len(gaps) // count} gaps per step); the largest:", file=sys.stderr)
    for gap, before, after in sorted(gaps, reverse=True)[:12]:
        print(f"  {gap / 1e3:7.2f} ms  after {before[:60]}  before {after[:60]}", file=sys.stderr)


def device_time(event) -> float:
    """An event's own device time in microseconds (the attribute's name changed across torch versions)."""
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def print_profile_summary(profiler, count: int) -> None:
    kernels: dict[str, float] = {}
    launches: dict[str, int] = {}
    for event in profiler.key_averages():
        microseconds = device_time(event)
        # Kernels only: operators (aten::), compiled-graph annotations (## ...) and the driver's queue events also
        # carry the device time of what they launched. A kernel can be listed twice (its launch annotation and
        # itself) with the same time: it counts once.
        if microseconds <= 0 or event.key.startswith(("aten::", "##", "Command Buffer", "cuda")):
            continue
        if re.fullmatch(r"\w+::\w+", event.key):  # a custom operator (litft::..., bitsandbytes::...), not a kernel
            continue
        kernels[event.key] = max(kernels.get(event.key, 0.0), microseconds)
        launches[event.key] = max(launches.get(event.key, 0), event.count)
    totals: dict[str, float] = {}
    for name, microseconds in kernels.items():
        category = next(label for label, needles in KERNEL_CATEGORIES if any(n in name.lower() for n in needles))
        totals[category] = totals.get(category, 0.0) + microseconds
    everything = sum(totals.values())
    print(f"GPU time per step: {everything / count / 1e3:.1f} ms", file=sys.stderr)
    for category, microseconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {category:36s} {microseconds / count / 1e3:9.2f} ms  {100 * microseconds / everything:5.1f}%",
              file=sys.stderr)
    # Every kernel also costs a launch gap (~2-3 us on an H100/H200): many short kernels cost more than their time.
    print(f"kernels per step: {sum(launches.values()) // count}; the most launched (count, mean us):", file=sys.stderr)
    for name, calls in sorted(launches.items(), key=lambda item: -item[1])[:30]:
        print(f"  {calls // count:6d} {kernels[name] / calls:8.1f}  {name[:100]}", file=sys.stderr)
    # Where the time goes, kernel by kernel: the compiled blocks' elementwise kernels are many small names.
    print("the kernels that take the most time (ms per step, launches per step, mean us):", file=sys.stderr)
    for name, microseconds in sorted(kernels.items(), key=lambda item: -item[1])[:40]:
        calls = launches[name]
        print(f"  {microseconds / count / 1e3:8.2f} {calls // count:6d} {microseconds / calls:8.1f}  {name[:100]}",
              file=sys.stderr)
    print("GEMMs by shape (per step): calls, ms, TFLOP/s", file=sys.stderr)
    rows = []
    for event in profiler.key_averages(group_by_input_shape=True):
        if event.key not in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::_scaled_mm"):
            continue
        shapes = [list(shape) for shape in event.input_shapes if shape]
        matrices = shapes[-2:] if event.key.startswith("aten::addmm") else shapes[:2]
        if len(matrices) < 2:
            continue
        (*batch, m, k), n = matrices[0], matrices[1][-1]
        flops = 2 * m * k * n * (batch[0] if batch else 1) * event.count
        microseconds = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if microseconds > 0:
            rows.append((microseconds, event.key, matrices, event.count, flops / microseconds / 1e6))
    for microseconds, key, matrices, calls, tflops in sorted(rows, reverse=True)[:40]:
        print(f"  {key:16s} {str(matrices):40s} {calls // count:5d} {microseconds / count / 1e3:8.2f} {tflops:7.1f}",
              file=sys.stderr)


@torch.inference_mode()
def bench_decode(args) -> dict:
    from litft.checkpoint import load_model
    from litft.generation import generate

    shape = SHAPES[args.shape]
    checkpoint = random_checkpoint(args.shape, Path(args.checkpoint_dir or f"{args.hf_dir}-{args.shape}"))
    prepare = None
    if args.decode_quantized:  # as `litft generate --quantize`: the base stored in --quantize's format
        from litft.adapters.quantization import quantize_model

        def prepare(meta_model):
            quantize_model(meta_model, args.quantize, compute_dtype=torch.bfloat16)

    model = load_model(checkpoint, dtype=torch.bfloat16, device=DEVICE, prepare=prepare).eval().requires_grad_(False)
    from litft.adapters import lora_experts

    lora_experts.lay_experts_back_to_back(model)  # as `litft generate` does: a mixture's experts in grouped GEMMs
    prompt = torch.randint(0, shape["vocab"], (args.prompt,)).tolist()

    def run(new_tokens: int):
        # --compile: each decoding step through torch.compile, replayed from a CUDA graph as without it.
        return generate(model, [prompt], new_tokens, stop_ids=[], compile=args.compile)

    # The compiled step is specialised to the KV cache's length, which follows the number of new tokens, so the
    # warm-up then runs the timed generation's length: the timed run must not include the compilation.
    run(args.new if args.compile else 8)
    synchronize()
    started = time.perf_counter()
    result = run(args.new)
    synchronize()
    elapsed = time.perf_counter() - started
    if args.profile:
        if args.compile:
            run(16)  # compiles for the profiled run's shorter cache outside the profile
        profile_steps(lambda: run(16), count=1, kernel_trace=args.kernel_trace)
    made = len(result[0].token_ids)
    return dict(prompt=args.prompt, new=args.new, compile=args.compile, tokens_per_s=round(made / elapsed, 1),
                quantized=args.quantize if args.decode_quantized else None,
                cuda_graph=bool(getattr(model, "decode_graph_safe", True)), experts_one_by_one=args.experts_one_by_one)


def set_inductor_option(parser: argparse.ArgumentParser, setting: str) -> None:
    import ast

    import torch._inductor.config as inductor_config

    name, _, text = setting.partition("=")
    *path, leaf = name.split(".")
    owner = inductor_config
    for part in path:
        owner = getattr(owner, part, None)
    if not text or owner is None or not hasattr(owner, leaf):
        parser.error(f"--inductor {setting}: expected NAME=VALUE with NAME an option of torch._inductor.config")
    setattr(owner, leaf, ast.literal_eval(text))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=["lora", "qlora", "dpo", "decode"], default="lora")
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-8b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--ckpt", action="store_true", help="activation checkpointing (every block unless --ckpt_blocks)")
    parser.add_argument("--offload", action="store_true", help="with --ckpt: keep the saved block inputs in host memory")
    parser.add_argument("--ckpt_blocks", type=int, default=None, help="with --ckpt: checkpoint only the first N blocks")
    parser.add_argument("--kept_output_widening", type=float, default=None,
                        help="with --ckpt --offload: keep the outputs of projections widening a token at most this "
                             "much (default litft's, 1.5: q/k/v, o and down; 0: recompute every projection)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--compiler", choices=["torch", "thunder"], default="torch", help="with --compile: which compiler")
    parser.add_argument("--thunder_fusion", choices=["torchcompile", "none"], default="torchcompile",
                        help="with --compiler thunder: its fusion executor (none: thunder's defaults alone, as before)")
    parser.add_argument("--mlp_tile_tokens", type=int, default=None,
                        help="training: run each block's MLP on tiles of this many tokens (default: untiled)")
    parser.add_argument("--quantize", default="bnb.nf4", help="qlora: how the base is stored (bnb.nf4, bnb.int8, fp8)")
    parser.add_argument("--inductor", action="append", default=[], metavar="NAME=VALUE",
                        help="set a torch._inductor.config option before compiling, e.g. combo_kernels=True or "
                             "triton.cudagraphs=True (repeatable; for experiments, recorded in the output)")
    parser.add_argument("--lora_dropout", type=float, default=0.0,
                        help="adapter dropout (the peers' protocol: 0; with --lora_one_by_one: the per-layer path)")
    parser.add_argument("--lora_one_by_one", action="store_true",
                        help="compute each LoRA layer on its own, not q/k/v and gate/up together (for comparison)")
    parser.add_argument("--bnb_dequantize", action="store_true",
                        help="qlora nf4: dequantize with bitsandbytes' kernels, not litft's (the A/B of that kernel)")
    parser.add_argument("--separate_base_gemms", action="store_true",
                        help="one base GEMM for each of q, k and v, not one for the three (for comparison)")
    parser.add_argument("--gated_product_apart", action="store_true",
                        help="the MLP's act(gate) * up as written and down in the grouped operator, not down's "
                             "operator with the activation (the A/B of litft.adapters.lora_gated_down)")
    parser.add_argument("--product_after_gate_up", action="store_true",
                        help="h = act(gate) * up by an elementwise kernel after gate's and up's GEMMs, not in their "
                             "GEMM's kernel (the A/B of litft.adapters.lora_gemm.gated_projections)")
    parser.add_argument("--adapter_gradients_apart", action="store_true",
                        help="B's gradient and dy @ B as two GEMMs each reading dy, not one kernel reading it once "
                             "(the A/B of litft.adapters.adapter_gradients)")
    parser.add_argument("--adapters_cast_per_operator", action="store_true",
                        help="each LoRA operator casts its adapters, not one copy per block call (the A/B of "
                             "litft.adapters.adapter_copies)")
    parser.add_argument("--adapter_gradients_smallest_columns", type=int, default=None,
                        help="the narrowest output gradient that takes the one-read adapter-gradient kernel on the "
                             "GPU (litft.adapters.adapter_gradients.SMALLEST_KERNEL_COLUMNS)")
    parser.add_argument("--experts_elementwise_eager", action="store_true",
                        help="A/B: under --compile, a mixture's weighted SwiGLU and its sum over slots eager "
                             "(as without --compile)")
    parser.add_argument("--experts_one_by_one", action="store_true",
                        help="A/B: a mixture's LoRA experts each on its own rows, not in grouped GEMMs")
    parser.add_argument("--rotary_as_written", action="store_true",
                        help="q, k, v split and rotated with autograd's backward, not litft.models.rotary_heads' "
                             "kernel writing the joined gradient")
    parser.add_argument("--attention", choices=["auto", "sdpa", "flash4"], default=None,
                        help="causal attention through FlashAttention-4 (flash4), SDPA (sdpa) or as litft chooses "
                             "(auto, the default)")
    parser.add_argument("--lora_gemm_group_rows", type=int, default=None,
                        help="row tiles per group in the LoRA GEMM kernel's tile order (litft.adapters.lora_gemm."
                             "GROUP_ROWS)")
    parser.add_argument("--idle_ms_per_step", type=float, default=0.0,
                        help="an experiment: the GPU idles this long before each step (time lost vs idle inserted "
                             "tells whether idle time costs its length at the power limit)")
    parser.add_argument("--sync_each_step", action="store_true",
                        help="read each step's metrics at once, as the training loop did before session 8 (comparison)")
    parser.add_argument("--cuda_graph", action="store_true",
                        help="experiment: replay the whole step from one CUDA graph (what host launches cost)")
    parser.add_argument("--lora_gemm", choices=["auto", "cublas", "triton", "warp_specialized"], default=None,
                        help="LITFT_LORA_GEMM: a projection's base GEMM and adapter update through cuBLAS, litft's "
                             "Triton kernel, its warp-specialized kernel (Hopper, where it takes the operands), or "
                             "whichever was faster for each shape (auto, the default)")
    parser.add_argument("--no_warp_specialized", action="store_true",
                        help="auto leaves out the warp-specialized LoRA GEMM (the A/B of litft.adapters."
                             "lora_gemm_pingpong)")
    parser.add_argument("--no_activation_backward_epilogue", action="store_true",
                        help="a gated down projection's backward writes d h and runs the activation's backward "
                             "apart, never in the warp-specialized kernel's epilogue (the A/B of "
                             "lora_gemm.gated_input_gradient)")
    parser.add_argument("--nf4_per_byte", action="store_true",
                        help="4-bit weights dequantize through the per-byte NF4 kernel (each byte's block scale "
                             "computed again), the A/B of the per-block one")
    parser.add_argument("--cross_entropy", choices=["kernel", "compiled"], default=None,
                        help="LITFT_CROSS_ENTROPY: the loss of each chunk of logits through litft's Triton kernel "
                             "(the default on GPUs) or torch.compile's fusion of the tensor code (the path before it)")
    parser.add_argument("--profile", action="store_true", help="print a kernel profile of two more steps (stderr)")
    parser.add_argument("--kernel_trace", default=None, metavar="PATH",
                        help="with --profile: write one step's kernels in order (JSON lines: start, us, name)")
    parser.add_argument("--decode_quantized", action="store_true", help="decode: the base stored as --quantize says")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--checkpoint_dir", default=None)
    parser.add_argument("--hf_dir", default=os.path.join(tempfile.gettempdir(), "peers-hf-checkpoint"))
    args = parser.parse_args()
    for setting in args.inductor:
        set_inductor_option(parser, setting)
    if args.mlp_tile_tokens is not None and args.task == "decode":
        parser.error("--mlp_tile_tokens applies to the training tasks (lora, qlora, dpo)")
    if args.idle_ms_per_step and DEVICE != "cuda":
        parser.error("--idle_ms_per_step needs a GPU (it idles the GPU between steps)")
    record = dict(peer="litft", task=args.task, shape=args.shape)
    if args.lora_gemm is not None:
        os.environ["LITFT_LORA_GEMM"] = record["lora_gemm"] = args.lora_gemm
    if args.cross_entropy is not None:
        os.environ["LITFT_CROSS_ENTROPY"] = record["cross_entropy"] = args.cross_entropy
    if args.inductor:
        record["inductor"] = args.inductor
    if args.task == "qlora":
        record["quantize"] = args.quantize
    if args.experts_one_by_one:  # the A/B of litft.adapters.lora_experts, training or decoding (then without graphs)
        from litft.adapters import lora_experts

        lora_experts.ENABLED = False
    try:
        record.update(bench_decode(args) if args.task == "decode" else bench_training(args))
        record["peak_mem_gib"] = peak_memory_gib()
    except Exception as error:  # report, so the rest of the benchmark command still runs
        record["error"] = f"{type(error).__name__}: {str(error)[:400]}"
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
