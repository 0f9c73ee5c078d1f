"""The peers on a mixture of experts, for the side-by-side MoE rows (the shared `peers.py` covers dense Llama only).

Same protocol as `bench.py --shape qwen3-moe`: Qwen3-30B-A3B's geometry on 12 of its 48 layers, the random bf16
checkpoint `bench.py` writes (`random_checkpoint`, Hugging Face layout), random tokens, 4 x 2048, LoRA rank 16 /
alpha 32 / no dropout on attention's four projections and every expert's, fused AdamW on the adapters, three
warm-up steps then eight timed ones. Each peer runs in its own process (Unsloth patches transformers on import)
and prints one JSON line: tokens_per_s, mfu (the work of a token's chosen experts), peak_mem_gib.

  hf       transformers + PEFT: the experts are transformers' fused (experts, 2I, C) and (experts, C, I)
           parameters, adapted through PEFT's `target_parameters` (one adapter per expert over gate and up
           together, one over down), bf16 adapters as in peers.py. --task decode: its generate, batch 1.
  unsloth  Unsloth's FastLanguageModel with the same target_modules as peers.py (it adds the experts' parameters
           itself); --task qlora loads the base in 4 bits.

litft adapts gate and up separately (two rank-16 adapters per expert where the peers have one rank-16 adapter over
both, 2r x C more in A): a little more adapter work on litft's side, under 1% of the step's multiply-adds.

  python benchmarks/peers_moe.py --checkpoint /tmp/peers-hf-checkpoint-qwen3-moe [--task lora|qlora|decode]
                                 [--peers hf,unsloth] [--batch 4] [--seq 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGETS = [*ATTENTION_TARGETS, "gate_proj", "up_proj", "down_proj"]


def with_tokenizer(folder: Path) -> Path:
    """Unsloth insists on a tokenizer next to the weights: a stand-in one (the tokens are random ids anyway)."""
    if not (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer, models

        vocabulary = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3}
        Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>")).save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(dict(
            tokenizer_class="PreTrainedTokenizerFast", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
            unk_token="<unk>", model_max_length=8192)))
    return folder


def timed_steps(step, parameters, tokens_per_step: int, warmup: int = 3, steps: int = 8) -> float:
    import torch

    optimizer = torch.optim.AdamW(parameters, lr=1e-4, fused=torch.cuda.is_available())
    for index in range(warmup + steps):
        if index == warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            began = time.perf_counter()
        loss = step()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return tokens_per_step * steps / (time.perf_counter() - began)


def hf_model(checkpoint: Path, device: str):
    """transformers' model with PEFT's adapters on attention and on the fused expert parameters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, device_map={"": device},
                                                 attn_implementation="sdpa")
    expert_parameters = sorted({
        name.split("layers.")[1].split(".", 1)[1] for name, _ in model.named_parameters()
        if ".experts." in name and name.endswith(("gate_up_proj", "down_proj"))
    })
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ATTENTION_TARGETS,
                        target_parameters=expert_parameters)
    model = get_peft_model(model, config)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(torch.bfloat16)
    return model, expert_parameters


def hf_train(arguments, vocab: int) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, expert_parameters = hf_model(Path(arguments.checkpoint), device)
    tokens = torch.randint(0, vocab, (arguments.batch, arguments.seq), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    speed = timed_steps(lambda: model(input_ids=tokens, labels=tokens).loss, trainable,
                        arguments.batch * arguments.seq, arguments.warmup, arguments.steps)
    return dict(tokens_per_s=speed, adapted_expert_parameters=expert_parameters,
                adapter_parameters=sum(parameter.numel() for parameter in trainable),
                experts_implementation=getattr(model.config, "_experts_implementation", None))


def unsloth_train(arguments, vocab: int) -> dict:
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(with_tokenizer(Path(arguments.checkpoint))), max_seq_length=arguments.seq,
        dtype=torch.bfloat16, load_in_4bit=arguments.task == "qlora", local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, bias="none",
                                             target_modules=TARGETS, random_state=0, use_gradient_checkpointing=False)
    FastLanguageModel.for_training(model)
    tokens = torch.randint(0, vocab, (arguments.batch, arguments.seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    speed = timed_steps(lambda: model(input_ids=tokens, labels=tokens).loss, trainable,
                        arguments.batch * arguments.seq, arguments.warmup, arguments.steps)
    return dict(tokens_per_s=speed, adapter_parameters=sum(parameter.numel() for parameter in trainable))


def decode(arguments, vocab: int) -> dict:
    """Greedy decoding of `--new` tokens after a `--prompt`-token prompt, batch 1, through each peer's generate."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if arguments.one == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            model_name=str(with_tokenizer(Path(arguments.checkpoint))),
            max_seq_length=arguments.prompt + arguments.new, dtype=torch.bfloat16, local_files_only=True)
        FastLanguageModel.for_inference(model)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(arguments.checkpoint, dtype=torch.bfloat16,
                                                     device_map={"": device}, attn_implementation="sdpa")
    prompt = torch.randint(0, vocab, (1, arguments.prompt), device=device)

    def run(count: int) -> int:
        made = model.generate(input_ids=prompt, max_new_tokens=count, min_new_tokens=count, do_sample=False)
        return made.shape[1] - arguments.prompt

    with torch.inference_mode():
        run(8)
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        made = run(arguments.new)
        if device == "cuda":
            torch.cuda.synchronize()
    return dict(tokens_per_s=made / (time.perf_counter() - began), prompt=arguments.prompt, new=arguments.new)


def versions(peer: str) -> dict[str, str]:
    """The peer's package versions, so that a result says what it measured."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "transformers", "peft"] + (["unsloth", "unsloth_zoo"] if peer == "unsloth" else [])
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def one_peer(arguments) -> None:
    import torch
    from bench import SHAPES, flops_per_token

    shape = SHAPES[arguments.shape]
    record = dict(peer=arguments.one, task=arguments.task, shape=arguments.shape, batch=arguments.batch,
                  seq=arguments.seq, versions=versions(arguments.one))
    try:
        if arguments.one == "hf" and arguments.task == "qlora":
            raise ValueError("bitsandbytes' 4-bit layers do not take transformers' fused 3-D expert parameters")
        if arguments.task == "decode":
            result = decode(arguments, shape["vocab"])
            record.update(tokens_per_s=round(result.pop("tokens_per_s"), 1), **result)
        else:
            run = {"hf": hf_train, "unsloth": unsloth_train}[arguments.one]
            result = run(arguments, shape["vocab"])
            speed = result.pop("tokens_per_s")
            record.update(tokens_per_s=round(speed), mfu=round(
                speed * flops_per_token(shape, arguments.seq, False) / (790.0 * 1e12), 3), **result)
        if torch.cuda.is_available():
            record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    except Exception as error:  # noqa: BLE001 - report it and let the next peer run
        record["error"] = f"{type(error).__name__}: {str(error)[:600]}"
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True, help="the random checkpoint bench.py wrote for --shape")
    parser.add_argument("--shape", default="qwen3-moe")
    parser.add_argument("--task", choices=["lora", "qlora", "decode"], default="lora")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--peers", default="hf,unsloth")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.one:
        return one_peer(arguments)
    for peer in arguments.peers.split(","):
        process = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--one", peer],
                                 capture_output=True, text=True)
        lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
        tail = (process.stderr.strip().splitlines() or ["?"])[-1][:600]
        print(lines[-1] if lines else json.dumps(dict(peer=peer, error=tail)), flush=True)


if __name__ == "__main__":
    main()
