"""`litft generate` and `litft chat`: text from a base model, a fine-tuned output, or a base plus a LoRA adapter.

stdout carries only generated text (or JSON records); everything else (load times, speed) goes to stderr, so the
output can be piped.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from litft.chat_templates import ChatTemplate, resolve_chat_template
from litft.errors import CheckpointError, ConfigError
from litft.models import flash_attention
from litft.tokenizer import Tokenizer

PRECISIONS = {
    "bf16-true": torch.bfloat16,
    "bf16": torch.bfloat16,
    "16-true": torch.float16,
    "fp16": torch.float16,
    "32-true": torch.float32,
    "fp32": torch.float32,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"--max_new_tokens {self.max_new_tokens}: must be 0 or more")
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature}: must be 0 (greedy) or more")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top_k {self.top_k}: must be 1 or more (or left out)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p {self.top_p}: must be in (0, 1]")

    def generator(self, device: torch.device) -> torch.Generator | None:
        return torch.Generator(device).manual_seed(self.seed) if self.seed is not None else None


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Tokenizer
    template: ChatTemplate | None  # the chat template asked for (None: plain continuation)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _base_of_finetuned(output_dir: Path) -> Path:
    """The base checkpoint a litft/PEFT adapter folder was trained on: litft_run.json's `base_checkpoint`, else
    adapter_config.json's `base_model_name_or_path`, where that is a local folder."""
    candidates = []
    for file, key in (("litft_run.json", "base_checkpoint"), ("adapter_config.json", "base_model_name_or_path")):
        path = output_dir / file
        if path.is_file():
            try:
                value = json.loads(path.read_text(encoding="utf-8")).get(key)
            except json.JSONDecodeError as error:
                raise CheckpointError(f"{path}: not valid JSON ({error})") from None
            if value:
                candidates.append(str(value))
    for candidate in candidates:
        for folder in (Path(candidate), Path("checkpoints") / candidate):
            if (folder / "config.json").is_file():
                return folder
    shown = candidates[0] if candidates else "unknown"
    raise CheckpointError(
        f"{output_dir}: is a LoRA adapter whose base model ({shown}) is not a local folder; pass the base with "
        f"--checkpoint BASE --adapter {output_dir}"
    )


def _resolve_precision(precision: str | None, device: torch.device) -> torch.dtype:
    if precision is None:
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def load_for_generation(
    checkpoint: Path | None,
    adapter: Path | None = None,
    precision: str | None = None,
    quantize: str | None = None,
    chat_template: str | None = None,
) -> Loaded:
    """Loads the model (base, plus its LoRA adapter where there is one) and its tokenizer, in eval mode, and resolves
    `chat_template` (None: no chat) before the model, so that a template that cannot be used stops the command
    before the slow part."""
    from litft.checkpoint import load_model

    if checkpoint is None:
        raise ConfigError("--checkpoint DIR is required (a model folder, e.g. from `litft download ORG/NAME`)")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"--checkpoint {checkpoint}: no such folder (download one with `litft download ORG/NAME`)")
    if adapter is not None:
        base, adapter_dir = checkpoint, Path(adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise CheckpointError(f"--adapter {adapter_dir}: no adapter_config.json; is this a LoRA adapter folder?")
    elif (checkpoint / "adapter_config.json").is_file():
        base, adapter_dir = _base_of_finetuned(checkpoint), checkpoint
    else:
        base, adapter_dir = checkpoint, None
    tokenizer_dir = next((f for f in (adapter_dir, checkpoint, base) if f is not None and _has_tokenizer(f)), base)
    tokenizer = Tokenizer.from_checkpoint(tokenizer_dir)
    # A template saved by litft lies beside the adapter (or in the fine-tuned/merged checkpoint).
    template = None if chat_template is None else resolve_chat_template(tokenizer, chat_template,
                                                                        adapter_dir or checkpoint)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _resolve_precision(precision, device)
    flash_attention.check_setting(device)  # a bad LITFT_FLASH_ATTENTION_4 stops here, before the weights load
    prepare = None
    if quantize is not None:
        if device.type != "cuda":
            raise ConfigError(f"--quantize {quantize}: bitsandbytes quantization needs a CUDA GPU")
        from litft.adapters.quantization import quantize_model

        def prepare(model: nn.Module) -> None:
            quantize_model(model, quantize, compute_dtype=dtype)

    started = time.perf_counter()
    model = load_model(base, dtype=dtype, device=device, prepare=prepare)
    if adapter_dir is not None:
        from litft.adapters.peft_format import load_peft_adapter

        load_peft_adapter(model, adapter_dir)
        model.to(device)
    model.eval().requires_grad_(False)
    from litft.adapters.lora_experts import lay_experts_back_to_back

    # A mixture's experts in one storage per projection kind: decoding then runs the chosen ones in grouped GEMMs
    # that read nothing on the host, so its steps replay from a CUDA graph.
    lay_experts_back_to_back(model)
    adapter_note = f" with adapter {adapter_dir}" if adapter_dir is not None else ""
    print(f"Loaded {base}{adapter_note} in {time.perf_counter() - started:.1f}s ({dtype}, {device})", file=sys.stderr)
    return Loaded(model, tokenizer, template)


class Streamer:
    """Writes one sequence's text to stdout as its tokens arrive. The whole sequence is decoded each time and only
    the new characters are written, because a token's text can depend on its neighbours (leading-space rules,
    characters split across byte tokens); text ending in an incomplete character waits for the next token."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.written = 0

    def __call__(self, _row: int, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._write(text)

    def finish(self) -> None:
        self._write(self.tokenizer.decode(self.ids))
        sys.stdout.write("\n")
        sys.stdout.flush()

    def _write(self, text: str) -> None:
        sys.stdout.write(text[self.written:])
        sys.stdout.flush()
        self.written = len(text)


def _read_prompts(prompt: str | list[str] | None, prompt_file: Path | None) -> list[str]:
    if (prompt is None) == (prompt_file is None):
        raise ConfigError("give exactly one of --prompt TEXT and --prompt_file FILE")
    if prompt is not None:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ConfigError("--prompt []: the list holds no prompt; give at least one")
        return prompts
    path = Path(prompt_file)
    if path.is_dir():
        raise ConfigError(f"--prompt_file {path}: is a folder; give a .txt or .jsonl file")
    if not path.is_file():
        raise ConfigError(f"--prompt_file {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return [text]
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{number}: not valid JSON ({error})") from None
        record = record.get("prompt") if isinstance(record, dict) else record
        if not isinstance(record, str):
            raise ConfigError(f"{path}:{number}: expected a JSON string or an object with a string `prompt`")
        prompts.append(record)
    if not prompts:
        raise ConfigError(f"--prompt_file {path}: no prompts in the file")
    return prompts


def warn_past_context(model: nn.Module, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
    """A note when a prompt and its continuation run past the positions the model was trained for: it generates
    there, but quality usually collapses, which looks like a litft bug unless it is said."""
    positions = getattr(getattr(model.config, "rope", None), "max_position_embeddings", None)
    longest = max(len(ids) for ids in prompt_ids)
    if isinstance(positions, int) and longest + max_new_tokens > positions:
        print(f"warning: the longest prompt has {longest} tokens and up to {max_new_tokens} more are generated, past "
              f"the {positions} positions of the checkpoint's max_position_embeddings", file=sys.stderr)


def _stop_ids(tokenizer: Tokenizer, template: ChatTemplate | None) -> list[int]:
    stop_ids = list(tokenizer.stop_ids)
    for token in template.stop_tokens if template is not None else []:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None and token_id not in stop_ids:
            stop_ids.append(token_id)
    return stop_ids


def generate(
    checkpoint: Path | None = None,
    prompt: str | list[str] | None = None,
    prompt_file: Path | None = None,
    adapter: Path | None = None,
    chat: bool = False,
    system: str | None = None,
    chat_template: str = "auto",
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    precision: str | None = None,
    quantize: Literal["bnb.nf4", "bnb.int8"] | None = None,
    compile: bool = False,
    cuda_graph: bool = True,
    output_format: Literal["text", "json"] = "text",
) -> None:
    """Continue one or more prompts with a model and print only the generated text.

    Args:
        checkpoint: A Hugging Face checkpoint folder, or a litft fine-tuned output (a LoRA adapter output loads
            its base model automatically).
        prompt: The text to continue; a JSON list (`--prompt '["a", "b"]'`) runs several prompts as one batch.
        prompt_file: A file holding one prompt, or with the .jsonl suffix one prompt per line (a JSON string or
            an object with a `prompt` field).
        adapter: A LoRA adapter folder (PEFT format) to apply on top of --checkpoint without merging.
        chat: Wrap each prompt as a user message in the chat template and generate the assistant's reply.
        system: A system message for --chat.
        chat_template: auto (the template saved with a fine-tuned output, else the checkpoint's own, else chatml
            or plain), checkpoint, alpaca, chatml, llama3, plain, or a .jinja file.
        max_new_tokens: The most tokens to generate per prompt; generation also stops at an EOS token.
        temperature: 0 picks the most likely token every time (greedy); higher values sample more freely.
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only from the smallest set of tokens whose probability adds up to top_p, in (0, 1].
        seed: Seed for sampling, for repeatable output.
        precision: bf16-true, 16-true or 32-true (also bf16, fp16, fp32). Default: bf16 on GPU, fp32 on CPU.
        quantize: Load the base weights in 4-bit NF4 or 8-bit (bitsandbytes, CUDA only).
        compile: Run each decoding step through torch.compile, which fuses its many small kernels (norms, rotary,
            activations, masks) into a few; with --cuda_graph (the default) the compiled step is what the graph
            replays, the fastest decoding. The prompt's prefill stays uncompiled. Compiling takes a while at
            the start, so it pays off for long generations.
        cuda_graph: On a GPU, replay each decoding step from a captured CUDA graph (no Python overhead per token).
        output_format: text streams the continuation; json prints one object per prompt with prompt, text,
            token_ids and finish_reason ("eos" or "length").
    """
    from litft.generation import generate as generate_ids

    sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed)
    sampling.validate()
    if system is not None and not chat:
        raise ConfigError("--system only applies with --chat")
    if chat_template != "auto" and not chat:
        raise ConfigError(f"--chat_template {chat_template} only applies with --chat true")
    prompts = _read_prompts(prompt, prompt_file)
    loaded = load_for_generation(checkpoint, adapter, precision, quantize, chat_template if chat else None)
    tokenizer, template = loaded.tokenizer, loaded.template
    if template is not None:
        print(f"chat template: {template.name}", file=sys.stderr)  # "plain" when the checkpoint has none
    prompt_ids = []
    for text in prompts:
        if template is not None:
            messages = ([{"role": "system", "content": system}] if system is not None else []) + [
                {"role": "user", "content": text}
            ]
            text = template.render(messages, add_generation_prompt=True)
        ids = tokenizer.encode(text)
        if not ids:
            raise ConfigError("--prompt is empty and this tokenizer adds no BOS token; give some text to continue")
        prompt_ids.append(ids)
    warn_past_context(loaded.model, prompt_ids, sampling.max_new_tokens)
    if sampling.temperature == 0 and (top_k is not None or top_p is not None):
        print("note: --top_k and --top_p apply when sampling; with --temperature 0 (the default) decoding is greedy",
              file=sys.stderr)

    stream = output_format == "text" and len(prompts) == 1
    streamer = Streamer(tokenizer) if stream else None
    started = time.perf_counter()
    results = generate_ids(
        loaded.model,
        prompt_ids,
        sampling.max_new_tokens,
        _stop_ids(tokenizer, template),
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        generator=sampling.generator(loaded.model.embeddings.weight.device),
        pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0,
        on_token=streamer,
        use_cuda_graph=cuda_graph,
        compile=compile,
    )
    elapsed = time.perf_counter() - started
    if streamer is not None:
        streamer.finish()
    for text, result in zip(prompts, results):
        continuation = tokenizer.decode(result.token_ids)
        if output_format == "json":
            record = {
                "prompt": text,
                "text": continuation,
                "token_ids": result.token_ids,
                "finish_reason": result.finish_reason,
            }
            print(json.dumps(record, ensure_ascii=False), flush=True)
        elif not stream:
            print(continuation, flush=True)
    new_tokens = sum(len(r.token_ids) for r in results)
    print(f"{new_tokens} tokens in {elapsed:.2f}s ({new_tokens / max(elapsed, 1e-9):.1f} tokens/s)", file=sys.stderr)


def chat(
    checkpoint: Path | None = None,
    adapter: Path | None = None,
    system: str | None = None,
    chat_template: str = "auto",
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_k: int | None = None,
    top_p: float | None = 0.9,
    seed: int | None = None,
    precision: str | None = None,
    quantize: Literal["bnb.nf4", "bnb.int8"] | None = None,
    compile: bool = False,
) -> None:
    """Chat with a model in the terminal: Enter sends, `/reset` starts over, Ctrl-D quits.

    Each message is answered with the whole conversation so far as the prompt, formatted by the chat template.

    Args:
        checkpoint: A Hugging Face checkpoint folder, or a litft fine-tuned output.
        adapter: A LoRA adapter folder (PEFT format) to apply on top of --checkpoint without merging.
        system: A system message that opens every conversation.
        chat_template: auto, checkpoint, alpaca, chatml, llama3, plain, or a .jinja file (see `litft generate`).
        max_new_tokens: The most tokens per reply.
        temperature: 0 is greedy; higher values sample more freely.
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only from the smallest set of tokens whose probability adds up to top_p, in (0, 1].
        seed: Seed for sampling, for repeatable replies.
        precision: bf16-true, 16-true or 32-true (also bf16, fp16, fp32). Default: bf16 on GPU, fp32 on CPU.
        quantize: Load the base weights in 4-bit NF4 or 8-bit (bitsandbytes, CUDA only).
        compile: Run each decoding step through torch.compile (see `litft generate`); a reply that needs a
            longer KV cache than any before it (lengths are rounded up to powers of two) compiles once more.
    """
    from litft.generation import generate as generate_ids

    sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed)
    sampling.validate()
    loaded = load_for_generation(checkpoint, adapter, precision, quantize, chat_template)
    tokenizer, template = loaded.tokenizer, loaded.template
    stop_ids = _stop_ids(tokenizer, template)
    generator = sampling.generator(loaded.model.embeddings.weight.device)
    opening = [{"role": "system", "content": system}] if system is not None else []
    history = list(opening)
    print(f"Chat template: {template.name}. /reset starts over, Ctrl-D quits.", file=sys.stderr)
    while True:
        print(">> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            print(file=sys.stderr)
            return
        message = line.rstrip("\n")
        if not message.strip():
            continue
        if message.strip() == "/reset":
            history = list(opening)
            print("(new conversation)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": message})
        prompt_ids = tokenizer.encode(template.render(history, add_generation_prompt=True))
        streamer = Streamer(tokenizer)
        result = generate_ids(
            loaded.model, [prompt_ids], sampling.max_new_tokens, stop_ids,
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, generator=generator,
            pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0, on_token=streamer, compile=compile,
        )[0]
        streamer.finish()
        history.append({"role": "assistant", "content": tokenizer.decode(result.token_ids)})
