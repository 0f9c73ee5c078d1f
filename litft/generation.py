"""Autoregressive generation with a KV cache: one prefill over the (left-padded) prompts, then one token per step.

Left padding keeps every prompt's last token in the same column, so each step appends one column for the whole
batch. Padding is masked through `document_ids` (0 = padding, 1 = real tokens, so real tokens never attend to it)
and positions count from each prompt's first real token, which makes a padded row compute exactly what it would
compute alone.

Prefill is an ordinary forward pass. The decoding steps have static shapes (DecodeStep), so on CUDA they replay
from a CUDA graph, and the host reads each step's tokens while the device already runs the next step: decoding
goes at the speed of the device's memory, not of Python. With `compile=True` the step also goes through
torch.compile first, which fuses its dozens of small elementwise kernels per layer (norms, rotary, activation,
mask, residuals, casts) into a few, so the replayed graph is mostly the weight-reading matmuls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from litft.models.common import KVCache


@dataclass
class GenerationResult:
    token_ids: list[int]  # the new tokens, without the stop token that ended them
    finish_reason: str  # "eos": a stop token was produced; "length": max_new_tokens was reached


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Picks the next token of each row from logits (B, vocab): argmax at temperature 0, else a sample from the
    temperature-scaled distribution restricted to the top_k most likely tokens and the top_p nucleus."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens ranked above it already reach top_p; the most likely token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probabilities = logits.softmax(dim=-1)
    return torch.multinomial(probabilities, num_samples=1, generator=generator).squeeze(-1)


def _left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """input_ids, position_ids (B, P) and document_ids (B, P), the last None when no prompt needs padding."""
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    document_ids = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        start = longest - len(prompt)
        input_ids[row, start:] = torch.tensor(prompt, dtype=torch.long)
        position_ids[row, start:] = torch.arange(len(prompt))
        document_ids[row, start:] = 1
    padded = any(len(p) < longest for p in prompts)
    return (
        input_ids.to(device),
        position_ids.to(device),
        document_ids.to(device) if padded else None,
    )


def _model_device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    weight = model.embeddings.weight
    return weight.device, weight.dtype if weight.is_floating_point() else torch.float32


def decode_forward(
    model: nn.Module, kv_cache: KVCache, input_ids: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """The work of one decoding step: the logits (B, vocab) after `input_ids` (B, 1) fed at `positions` (B, 1),
    which then advance in place. A plain function of its inputs, so eager and compiled steps run the same code."""
    hidden = model.hidden_states(input_ids, positions, None, kv_cache)  # (B, 1, hidden)
    positions += 1
    return model.logits(hidden[:, -1])  # (B, vocab)


_compiled_decode_forward: Callable[..., torch.Tensor] | None = None


def compiled_decode_forward() -> Callable[..., torch.Tensor]:
    """`decode_forward` under torch.compile, wrapped on first use (importing the compiler costs seconds, which
    eager runs should not pay). Dynamo keeps one graph per set of guards it passes: a graph per batch size, cache
    length and model geometry, shared by every generation with those (the weights are graph inputs, not
    constants, so two models of one architecture and size share a graph too).

    - Default mode, not "reduce-overhead": DecodeStep captures the whole step in a CUDA graph itself, the same
      way for eager and compiled steps. Inductor's own CUDA graphs would only repeat that, and they fall back to
      running uncaptured when a graph writes into inputs that they neither allocated nor know to stay put, which
      every step does (the KV cache, the positions).
      No "max-autotune" either: it spends minutes tuning Triton matmuls, and a decoding step's matmuls are
      matrix-vector products bound by reading the weights, which cuBLAS already does at the memory's speed.
    - dynamic=False: the step's shapes never change during a generation, and the cache length comes in a few
      sizes (`_cache_length`), each compiled with every size fixed. By default dynamo would switch to symbolic
      sizes on meeting a second length, and every later generation would run kernels that read their sizes at
      run time, for little gain: with the lengths rounded, each new one is rare.
    - Not fullgraph: every family traces as one graph today (tests/test_decode_compiled.py checks Llama), but a
      layer dynamo cannot trace (a quantized matmul, say) should cost a graph break, not the whole feature.
    Past dynamo's recompile limit (8 graphs of this function per process) it runs the step uncompiled."""
    global _compiled_decode_forward
    if _compiled_decode_forward is None:
        _compiled_decode_forward = torch.compile(decode_forward, dynamic=False)
    return _compiled_decode_forward


def _cache_length(needed: int, compile: bool) -> int:
    """The KV cache's slots for `needed` of them: a multiple of 16, because SDPA's memory-efficient kernel pads
    every mask row to that otherwise (each step attends over all slots; the spare ones lie in the future, so they
    are masked). A compiled step is specialised to the cache length, so there it is the next power of two (16 at
    least) instead: later generations of similar length (a chat's next turn, a benchmark's timed run after its
    warm-up) reuse the compiled step, and lengths up to L cost at most log2(L) compilations, for at most twice
    the cache."""
    if compile:
        return max(16, 1 << (needed - 1).bit_length())
    return -(-needed // 16) * 16


class DecodeStep:
    """One decoding step with static shapes: the logits (B, vocab) that follow `tokens` (B,), one per row.

    The KV cache switches to static addressing (litft.models.common.KVCache): the step writes at a slot held in a
    device tensor and attends over every slot under a mask built on the device. Its other inputs are buffers that
    stay put: the tokens are copied into `input_ids` and the positions advance in place. So every call launches
    the same kernels on the same memory, without host reads, which lets a CUDA graph record the step once and
    replay it: one launch per token instead of one per kernel, where eager decoding spends most of its time.

    `compile=True` runs the step through torch.compile (`compiled_decode_forward`), which fuses the elementwise
    work around the matmuls; the shapes and buffers being fixed, it compiles once, on the first call, and with
    `use_cuda_graph` the compiled kernels are what the graph records."""

    def __init__(
        self,
        model: nn.Module,
        kv_cache: KVCache,
        positions: torch.Tensor,
        use_cuda_graph: bool,
        compile: bool = False,
    ) -> None:
        kv_cache.make_static()
        self.model = model
        self.kv_cache = kv_cache
        self.positions = positions.clone()  # (B, 1): each row's position of the token being fed
        self.input_ids = torch.zeros_like(self.positions)  # (B, 1)
        self.forward_function = compiled_decode_forward() if compile else decode_forward
        self.use_cuda_graph = use_cuda_graph and positions.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None  # (B, vocab): where each replay leaves its logits

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.input_ids.copy_(tokens[:, None])
        if self.graph is not None:
            self.graph.replay()
            return self.graph_logits
        if not self.use_cuda_graph:
            return self._forward()
        return self._forward_then_capture()

    def _forward(self) -> torch.Tensor:
        return self.forward_function(self.model, self.kv_cache, self.input_ids, self.positions)

    def _forward_then_capture(self) -> torch.Tensor:
        """The first step runs uncaptured on a side stream, so one-time set-up (cuBLAS workspaces, lazily built
        tables and, for a compiled step, the compilation and Triton's first-launch tuning, which synchronize)
        happens outside the capture; the capture on that same stream then records the step (recording runs
        nothing, so the cache and positions do not move) for the next calls to replay."""
        main, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            logits = self._forward()
        main.wait_stream(side)
        logits.record_stream(main)  # allocated on the side stream, read on the main one
        # A step that read on the host (a mixture whose experts ran one by one) cannot be recorded: it runs eager.
        if not getattr(self.model, "decode_graph_safe", True):
            self.use_cuda_graph = False
            return logits
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):
            self.graph_logits = self._forward()
        return logits


def _copy_to_host(tokens: torch.Tensor) -> Callable[[], list[int]]:
    """Starts copying `tokens` (B,) to the host and returns the function that waits for them. On CUDA the copy
    is queued behind the sampling, so work queued after this call (the next step) keeps the device busy while
    the host waits for the copy alone."""
    if tokens.device.type != "cuda":
        return tokens.tolist
    pinned = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    pinned.copy_(tokens, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list[int]:
        copied.synchronize()
        return pinned.tolist()

    return wait


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    on_token: Callable[[int, int], None] | None = None,
    use_cuda_graph: bool = True,
    compile: bool = False,
) -> list[GenerationResult]:
    """Continues every prompt by up to `max_new_tokens` tokens, stopping a row at its first id in `stop_ids`.

    `on_token(batch_index, token_id)` is called for each new token as it is produced (not for stop tokens).
    `use_cuda_graph`: replay each decoding step from a CUDA graph when the model is on a CUDA device (elsewhere
    the same static step runs without one).
    `compile`: run each decoding step through torch.compile (DecodeStep), captured in the CUDA graph where there is
    one. The first generation of each batch size and cache length pays the compilation; the prefill stays eager
    (it runs once per generation, its time goes to large matmuls, and prompt lengths vary)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    device, dtype = _model_device_and_dtype(model)
    input_ids, position_ids, document_ids = _left_pad(prompts, pad_id, device)
    results = [GenerationResult([], "length") for _ in prompts]
    if max_new_tokens <= 0:
        return results
    # Step k feeds the k-th new token at slot P + k and the last one is never fed: P + max_new_tokens - 1 slots.
    slots = _cache_length(input_ids.shape[1] + max_new_tokens - 1, compile)
    kv_cache = model.make_kv_cache(len(prompts), slots, device, dtype)
    hidden = model.hidden_states(input_ids, position_ids, document_ids, kv_cache)  # (B, P, hidden)
    step = DecodeStep(model, kv_cache, position_ids[:, -1:] + 1, use_cuda_graph, compile)

    def pick(logits: torch.Tensor) -> torch.Tensor:  # (B, vocab) -> (B,)
        return sample_next(logits, temperature, top_k, top_p, generator)

    tokens = pick(model.logits(hidden[:, -1]))  # (B,)
    stop = set(stop_ids)
    finished = [False] * len(prompts)
    for index in range(max_new_tokens):
        read_tokens = _copy_to_host(tokens)
        if index + 1 < max_new_tokens:
            # Queue the next step before reading this one's tokens, so the device never idles while the host
            # handles them. Finished rows keep stepping (their output is ignored) so the batch stays a rectangle;
            # if every row stops here, this one step is wasted.
            tokens = pick(step(tokens))
        for row, token in enumerate(read_tokens()):
            if finished[row]:
                continue
            if token in stop:
                results[row].finish_reason, finished[row] = "eos", True
                continue
            results[row].token_ids.append(token)
            if on_token is not None:
                on_token(row, token)
        if all(finished):
            break
    return results
