"""Training rows through FlashAttention-4's kernels (litft.models.flash_attention): packed rows through its
variable-length ones, the documents' offsets, sliding windows and soft-capping given as numbers, and the same logits
and gradients as the dense masks.

On CPU a reference module stands in for the package's kernels. It keeps their contract (documents laid end to end
between `cu_seqlens` offsets, causal within each, the log-sum-exp saved for the backward), so these tests check
litft's side: the offsets, the flattening of q, k and v, the operators' autograd, and the choice of path. On a
Hopper GPU with the package installed, the real kernels are checked against float32 attention and in a compiled
LoRA model's training step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_attention_as_close, causal_window_mask, fa4_ready
from torch.nn.attention import SDPBackend, sdpa_kernel

from litft.data import IGNORE_INDEX
from litft.models import build_model, common, flash_attention
from litft.training.objectives import SupervisedObjective

LLAMA = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 512, "tie_word_embeddings": False,
}


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Every test starts and ends with empty dynamo caches: what one test's compiled blocks learnt about changing
    shapes (automatic dynamic shapes) would otherwise shape the next test's first compile."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def packed_batch(rows: list[list[int]], vocab: int = 256, seed: int = 0) -> dict:
    """A batch as `--data.pack true` collates it: rows of documents of the given lengths, padded to the longest."""
    generator = torch.Generator().manual_seed(seed)

    def sample(length: int) -> dict:
        tokens = torch.randint(3, vocab, (length + 1,), generator=generator)
        return {"input_ids": tokens[:-1], "targets": tokens[1:]}

    return SupervisedObjective(pad_id=0).collate([[sample(n) for n in row] for row in rows])


# ----------------------------------------------------------------------------------------------------------------
# Offsets
# ----------------------------------------------------------------------------------------------------------------


def test_offsets_begin_a_document_at_every_change_of_id_and_at_every_row():
    """Row 0 ends in document 1 and row 1 begins with document 1: two documents all the same. A row's padding
    (id 0) is a document of its own."""
    document_ids = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 2, 2, 2, 0], [1, 2, 3, 0, 0, 0]])
    offsets = flash_attention.document_offsets(document_ids)
    assert offsets.dtype == torch.int32
    assert offsets.tolist() == [0, 6, 8, 11, 12, 13, 14, 15, 18]


def test_collating_packed_rows_gives_their_offsets():
    """The collate function finds the offsets on the host; the documents between them are the samples (and each
    row's padding), in order. Rows of one sample each have no document ids and no offsets."""
    rows = [[5, 11, 6], [17, 9]]
    batch = packed_batch(rows)
    width = batch["input_ids"].shape[1]  # 26: the longest row
    lengths = batch["document_offsets"].diff().tolist()
    assert lengths == [5, 11, 6, 4, 17, 9], lengths  # row 0 is padded by 26 - 22 tokens
    assert batch["document_offsets"][-1] == 2 * width
    single = SupervisedObjective(pad_id=0).collate([[{"input_ids": torch.arange(4), "targets": torch.arange(4)}]])
    assert single["document_ids"] is None and "document_offsets" not in single


# ----------------------------------------------------------------------------------------------------------------
# CPU, through a reference for the kernels
# ----------------------------------------------------------------------------------------------------------------


def document_attention(q, k, v, scale, window_left=None, softcap=0.0):
    """Causal attention of one document, q (L, n_head, hd) over k, v (L, n_kv_head, hd), in float64, each query
    seeing `window_left` keys before its own where given, its scaled scores capped at `softcap` where non-zero (the
    package's conventions): the output (L, n_head, hd), the log-sum-exp (n_head, L), and what the backward reads
    (the probabilities, the cap's derivative, k and v repeated over each group)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    cap_slope = torch.ones_like(scores)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
        cap_slope = 1 - (scores / softcap) ** 2
    allowed = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).tril()
    if window_left is not None:
        allowed = allowed.triu(-window_left)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (n_head, L, L)
    return torch.einsum("hqk,khd->qhd", probs, v), torch.logsumexp(scores, dim=-1), probs, cap_slope, k, v


def document_attention_gradients(q, k, v, grad_out, scale, window_left=None, softcap=0.0):
    """The gradients of q, k, v of `document_attention` (written out: the kernels run below autograd), a key/value
    head's summed over its group of query heads."""
    out, _, probs, cap_slope, k_heads, v_heads = document_attention(q, k, v, scale, window_left, softcap)
    grad_out = grad_out.double()
    grad_v = torch.einsum("hqk,qhd->khd", probs, grad_out)
    grad_probs = torch.einsum("qhd,khd->hqk", grad_out, v_heads)
    grad_scores = probs * (grad_probs - (grad_probs * probs).sum(dim=-1, keepdim=True)) * cap_slope * scale
    grad_q = torch.einsum("hqk,khd->qhd", grad_scores, k_heads)
    grad_k = torch.einsum("hqk,qhd->khd", grad_scores, q.double())
    L, n_kv_head, head_dim = k.shape
    grouped = [g.reshape(L, n_kv_head, -1, head_dim).sum(dim=2) for g in (grad_k, grad_v)]
    return grad_q, *grouped


def document_spans(offsets: torch.Tensor):
    bounds = offsets.tolist()
    return zip(bounds[:-1], bounds[1:])


class ReferenceKernels:
    """The two entry points litft calls, with the package's contract, in plain torch: rows (B, T, heads, hd), or
    documents laid end to end between `cu_seqlens` offsets (N, heads, hd); causal, a window of `window_size_left`
    earlier keys where given, scores soft-capped where `softcap` is non-zero. `calls` records each call's kind and
    its window and cap, so tests see what the kernels were given."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.masks: list[tuple[int | None, float]] = []

    @staticmethod
    def _spans(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> list:
        """Each row's index into (B, T, heads, hd) tensors, or each document's slice of (N, heads, hd) ones."""
        if cu_seqlens_q is None:
            return list(range(q.shape[0]))
        assert cu_seqlens_q is cu_seqlens_k and cu_seqlens_q.dtype == torch.int32 and max_seqlen_q == max_seqlen_k
        spans = list(document_spans(cu_seqlens_q))
        assert all(end - start <= max_seqlen_q for start, end in spans)
        return [slice(start, end) for start, end in spans]

    def _flash_attn_fwd(self, q, k, v, *, softmax_scale, causal, softcap, return_lse, out, lse, cu_seqlens_q=None,
                        cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, window_size_left=None):
        assert causal and return_lse
        assert q.dtype == k.dtype == v.dtype == out.dtype, (q.dtype, k.dtype, v.dtype)  # as the kernels require
        assert q.stride(-1) == 1 and out.is_contiguous()
        self.calls.append("forward")
        self.masks.append((window_size_left, softcap))
        for span in self._spans(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
            document_out, document_lse, *_ = document_attention(q[span], k[span], v[span], softmax_scale,
                                                                window_size_left, softcap)
            out[span] = document_out.to(out.dtype)
            # lse is (B, n_head, T) for rows, (n_head, N) for documents laid end to end.
            lse[(span,) if cu_seqlens_q is None else (slice(None), span)] = document_lse.float()

    def _flash_attn_bwd(self, q, k, v, out, dout, lse, *, softmax_scale, causal, softcap, dq, dk, dv,
                        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                        window_size_left=None):
        assert causal
        self.calls.append("backward")
        for span in self._spans(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
            grads = document_attention_gradients(q[span], k[span], v[span], dout[span], softmax_scale,
                                                 window_size_left, softcap)
            for grad, target in zip(grads, (dq, dk, dv)):
                target[span] = grad.to(target.dtype)


@pytest.fixture
def reference_kernels(monkeypatch) -> ReferenceKernels:
    """The reference in the package's place, and the path open on CPU in float32 (a GPU and 16 bits otherwise)."""
    kernels = ReferenceKernels()
    monkeypatch.setattr(flash_attention, "kernels", lambda: kernels)
    monkeypatch.setattr(flash_attention, "rows_apply", lambda device, dtype, head_dim: True)
    return kernels


def loss_and_gradients(model, batch: dict, **inputs) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    logits = model(batch["input_ids"], batch["position_ids"], batch["document_ids"], **inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    return logits.detach(), loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("offsets_from", ["collate", "model"])
def test_packed_rows_through_the_kernels_match_the_dense_document_masks(reference_kernels, monkeypatch, offsets_from):
    """A grouped-query Llama on packed rows (padding included): logits, loss and every gradient as with SDPA under
    dense document masks, whether the collate function found the offsets or the model finds them."""
    model = build_model(LLAMA).float()
    batch = packed_batch([[5, 11, 6], [17, 9], [3, 3, 3, 3, 3]])
    inputs = {"document_offsets": batch["document_offsets"]} if offsets_from == "collate" else {}
    monkeypatch.setattr(common, "FLEX_ATTENTION", "never")
    packed = loss_and_gradients(model, batch, **inputs)
    assert reference_kernels.calls == ["forward", "forward", "backward", "backward"]  # one per layer each way
    monkeypatch.setattr(flash_attention, "rows_apply", lambda device, dtype, head_dim: False)
    dense = loss_and_gradients(model, batch)
    assert len(reference_kernels.calls) == 4
    real = batch["document_ids"] != 0
    torch.testing.assert_close(packed[0][real], dense[0][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1], dense[1], atol=1e-6, rtol=1e-6)
    for name, gradient in dense[2].items():
        torch.testing.assert_close(packed[2][name], gradient, atol=1e-6, rtol=1e-5, msg=name)


def test_under_autocast_the_kernels_get_one_16_bit_dtype(reference_kernels, monkeypatch):
    """bf16-mixed: Qwen3's per-head norms hand over q and k in float32 beside a bf16 v; the kernels get all three in
    bf16, as SDPA under autocast computes them, and the logits stay with the dense masks' within bf16's rounding."""
    model = build_model({**LLAMA, "model_type": "qwen3", "head_dim": 16}).float()
    batch = packed_batch([[5, 11, 6], [17, 9]])
    monkeypatch.setattr(common, "FLEX_ATTENTION", "never")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed = model(batch["input_ids"], batch["position_ids"], batch["document_ids"])
        monkeypatch.setattr(flash_attention, "rows_apply", lambda device, dtype, head_dim: False)
        dense = model(batch["input_ids"], batch["position_ids"], batch["document_ids"])
    assert reference_kernels.calls == ["forward", "forward"]
    real = batch["document_ids"] != 0
    torch.testing.assert_close(packed[real].float(), dense[real].float(), atol=0.05, rtol=0.05)


WINDOWED_MODELS = {  # each with two layers, rows of 32 tokens below: (config, what each layer's kernel call gets)
    # Gemma 2: a sliding layer then a full one, both soft-capped (a small cap, so that it changes the scores).
    "gemma2": ({"model_type": "gemma2", "attn_logit_softcapping": 0.5, "final_logit_softcapping": 2.0,
                "query_pre_attn_scalar": 24, "head_dim": 16, "sliding_window": 8}, [(7, 0.5), (None, 0.5)]),
    "gemma3": ({"model_type": "gemma3_text", "query_pre_attn_scalar": 24, "head_dim": 16, "sliding_window": 8,
                "layer_types": ["sliding_attention", "full_attention"]}, [(7, 0.0), (None, 0.0)]),
    "mistral": ({"model_type": "mistral", "sliding_window": 8}, [(7, 0.0), (7, 0.0)]),
    # A window as long as the rows cuts nothing: the kernels' plain causal mode.
    "mistral-long-window": ({"model_type": "mistral", "sliding_window": 64}, [(None, 0.0), (None, 0.0)]),
}


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "rows"])
@pytest.mark.parametrize("model_name", list(WINDOWED_MODELS))
def test_windows_and_soft_capping_go_to_the_kernels_as_numbers(reference_kernels, monkeypatch, model_name, packed):
    """With LITFT_FLASH_ATTENTION_4_WINDOWS=on, sliding windows and soft-capping are given to the kernels (a window
    of W keys is W - 1 to the left of the query's own), for packed rows and plain ones alike: logits, loss and every
    gradient as with SDPA under the dense masks and explicit capped scores."""
    monkeypatch.setattr(flash_attention, "WINDOWS", "on")
    config, expected_masks = WINDOWED_MODELS[model_name]
    model = build_model({**LLAMA, **config}).float()
    if packed:
        batch = packed_batch([[20, 12], [9, 23]])  # rows of 32 tokens, documents longer and shorter than 8
    else:
        ids = torch.randint(3, 256, (2, 33), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "position_ids": None, "document_ids": None}
    monkeypatch.setattr(common, "FLEX_ATTENTION", "never")
    kernels = loss_and_gradients(model, batch)
    assert reference_kernels.calls == ["forward", "forward", "backward", "backward"]
    assert reference_kernels.masks == expected_masks
    monkeypatch.setattr(flash_attention, "rows_apply", lambda device, dtype, head_dim: False)
    dense = loss_and_gradients(model, batch)
    real = batch["document_ids"] != 0 if packed else torch.ones_like(batch["input_ids"], dtype=torch.bool)
    torch.testing.assert_close(kernels[0][real], dense[0][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernels[1], dense[1], atol=1e-6, rtol=1e-6)
    for name, gradient in dense[2].items():
        torch.testing.assert_close(kernels[2][name], gradient, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "rows"])
@pytest.mark.parametrize("model_name", list(WINDOWED_MODELS))
def test_by_default_windows_and_soft_capping_keep_the_masks(reference_kernels, model_name, packed):
    """Until its GPU tests have run, a window shorter than the rows or a cap keeps a model with the masks (a window
    as long as the rows is no window: those rows take the kernels)."""
    config, _ = WINDOWED_MODELS[model_name]
    model = build_model({**LLAMA, **config}).float()
    batch = packed_batch([[20, 12], [30]])  # rows of 32 tokens
    with torch.no_grad():
        if packed:
            model(batch["input_ids"], batch["position_ids"], batch["document_ids"], None, batch["document_offsets"])
        else:
            model(batch["input_ids"])
    assert bool(reference_kernels.calls) == (model_name == "mistral-long-window")


@pytest.mark.parametrize(("window", "softcap"), [(flash_attention.NO_WINDOW, flash_attention.NO_SOFTCAP), (5, 2.0)])
def test_the_operators_pass_torch_library_checks_through_the_reference(reference_kernels, window, softcap):
    """Both operators, with and without a window and a cap, through the reference: their schemas, fake tensors
    and autograd registrations agree with what they compute (the GPU runs the same checks on the real kernels)."""
    generator = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0, 10, 13, 25, 32], dtype=torch.int32)
    tokens = [torch.randn(32, count, 16, generator=generator).requires_grad_() for count in (4, 2, 2)]
    torch.library.opcheck(torch.ops.litft.flash_attention_packed.default,
                          (*tokens, offsets, 16, 0.25, window, softcap))
    rows = [torch.randn(2, 16, count, 16, generator=generator).requires_grad_() for count in (4, 2, 2)]
    torch.library.opcheck(torch.ops.litft.flash_attention.default, (*rows, 0.25, window, softcap))
    assert reference_kernels.masks[-1] == (window - 1 if window else None, softcap)


def test_a_window_holds_at_least_the_query_itself():
    with pytest.raises(ValueError, match="at least one key"):
        flash_attention._window(0, 16)
    assert flash_attention._window(16, 16) == flash_attention.NO_WINDOW
    assert flash_attention._window(None, 16) == flash_attention.NO_WINDOW
    assert flash_attention._window(15, 16) == 15


def test_the_kernels_need_a_16_bit_compute_dtype_on_a_gpu(monkeypatch):
    """float32 (or bf16 on CPU) keeps the masks; bf16 autocast counts as bf16."""
    monkeypatch.setattr(flash_attention, "usable_on", lambda index: True)
    cuda = torch.device("cuda", 0)
    assert flash_attention.rows_apply(cuda, torch.bfloat16, 128)
    assert flash_attention.rows_apply(cuda, torch.float16, 64)
    assert not flash_attention.rows_apply(cuda, torch.float32, 128)
    assert not flash_attention.rows_apply(torch.device("cpu"), torch.bfloat16, 128)
    assert not flash_attention.rows_apply(cuda, torch.bfloat16, 12)
    x = torch.zeros(2, dtype=torch.float32)
    assert common.compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert common.compute_dtype(x) == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------------
# GPU: the real kernels
# ----------------------------------------------------------------------------------------------------------------

GPU_ROWS = [[70, 200, 33, 150, 147], [300, 5, 90, 180], [129, 128, 256, 1]]


def gpu_only() -> None:
    if not fa4_ready():
        pytest.skip("needs a Hopper or Blackwell GPU and the flash-attn-4 package")


@pytest.mark.gpu
@pytest.mark.parametrize(("head_dim", "kv_heads", "window", "softcap"), [  # each compiles its own kernels
    (128, 2, None, None), (64, 8, None, None),
    (256, 4, 100, 2.0),  # Gemma 2: heads of 256, a window shorter than some documents, a cap that bites
])
def test_on_the_gpu_packed_rows_match_float32_attention(head_dim, kv_heads, window, softcap):
    """bf16 variable-length kernels against float32 attention under the dense document (and window) mask, with
    explicit capped scores: no larger errors than the masked path's in bf16, on the real tokens and their
    gradients."""
    gpu_only()
    batch = packed_batch(GPU_ROWS)
    document_ids = batch["document_ids"].cuda()
    offsets = batch["document_offsets"].cuda()
    B, T = document_ids.shape
    heads = 8
    generator = torch.Generator().manual_seed(3)
    memory = [torch.randn(B, T, count, head_dim, generator=generator) for count in (heads, kv_heads, kv_heads)]
    grad = torch.randn(B, heads, T, head_dim, generator=generator).cuda()
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    mask = (same_document & causal_window_mask(T, window))[:, None]  # (B, 1, T, T)
    real = (document_ids != 0)[:, None, :, None]  # padding's rows differ by path and are never trained

    def run(attend, dtype):
        q, k, v = (t.to("cuda", dtype).transpose(1, 2).requires_grad_() for t in memory)  # (B, heads, T, hd)
        out = attend(q, k, v)
        out.backward((grad * real).to(dtype))
        return [(out * real).float(), q.grad.float(), k.grad.float(), v.grad.float()]

    def masked(q, k, v):
        return common.attention(q, k, v, mask, False, scale=0.1, softcap=softcap)

    with sdpa_kernel([SDPBackend.MATH]):
        reference = run(masked, torch.float32)
    packed = run(lambda q, k, v: flash_attention.packed_causal_attention(q, k, v, offsets, 0.1, window, softcap),
                 torch.bfloat16)
    masked_bf16 = run(masked, torch.bfloat16)
    assert_attention_as_close(packed, masked_bf16, reference)


@pytest.mark.gpu
def test_on_the_gpu_the_packed_operators_pass_torch_library_checks():
    """Fake tensors (shapes, strides, dtypes) agree with the kernels' outputs, and autograd's registration holds."""
    gpu_only()
    offsets = torch.tensor([0, 100, 130, 256, 512], dtype=torch.int32, device="cuda")
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(512, count, 64, generator=generator).to("cuda", torch.bfloat16).requires_grad_()
               for count in (8, 2, 2))
    for window, softcap in ((flash_attention.NO_WINDOW, flash_attention.NO_SOFTCAP), (64, 30.0)):
        torch.library.opcheck(torch.ops.litft.flash_attention_packed.default,
                              (q, k, v, offsets, 256, 0.125, window, softcap))


@pytest.mark.gpu
def test_on_the_gpu_a_compiled_lora_step_on_packed_rows_matches_float32_as_flex_does(monkeypatch):
    """A compiled bf16 LoRA Llama (grouped heads) on packed rows: through the variable-length kernels its loss and
    adapter gradients are within bf16's reach of the float32 model's, as through flex_attention; the compiled
    blocks call the operator once a layer; batches with other numbers of documents run on."""
    gpu_only()
    from conftest import assert_flash_attention_as_close, flash_attention_step_errors

    from litft.training.loss import CausalLMObjective

    config = {**LLAMA, "hidden_size": 256, "intermediate_size": 512, "head_dim": 64}
    batches = [packed_batch(rows, seed=index) for index, rows in enumerate(
        (GPU_ROWS, [[600], [1, 599], [128] * 4 + [88]], [[40] * 15, [300, 300]]))]

    def step_on(batch):
        def step(model):
            inputs = {name: batch[name].cuda() for name in ("input_ids", "targets", "position_ids", "document_ids",
                                                             "document_offsets", "trained_positions")}
            return CausalLMObjective(model)(inputs.pop("input_ids"), inputs.pop("targets"), **inputs)
        return step

    # Other documents compile the blocks first (the offsets' length changes: a recompile, then dynamic shapes).
    report = flash_attention_step_errors(monkeypatch, config, step_on(batches[0]), "litft::flash_attention_packed",
                                         warmup=tuple(step_on(batch) for batch in batches[1:]))
    assert (report["always"]["calls"], report["never"]["calls"]) == (2, 0), report  # once per block; flex
    assert_flash_attention_as_close(report)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "rows"])
def test_on_the_gpu_a_compiled_gemma2_lora_step_matches_float32_as_the_masks_do(monkeypatch, packed):
    """A compiled bf16 LoRA Gemma 2 (a sliding and a full layer, both soft-capped, heads of 128): through the
    kernels, windows and cap given as numbers, its loss and adapter gradients are within bf16's reach of the
    float32 model's, as through flex_attention (Gemma 2's path on CUDA for packed and plain rows alike without the
    kernels); the compiled blocks call the operator once a layer."""
    gpu_only()
    from conftest import assert_flash_attention_as_close, flash_attention_step_errors

    from litft.training.loss import CausalLMObjective

    monkeypatch.setattr(flash_attention, "WINDOWS", "on")
    config = {**LLAMA, "model_type": "gemma2", "hidden_size": 256, "intermediate_size": 512, "head_dim": 128,
              "query_pre_attn_scalar": 128, "sliding_window": 100, "attn_logit_softcapping": 2.0,
              "final_logit_softcapping": 30.0}
    if packed:
        batch = packed_batch(GPU_ROWS)
        names = ("input_ids", "targets", "position_ids", "document_ids", "document_offsets", "trained_positions")
        inputs = {name: batch[name].cuda() for name in names}
    else:
        ids = torch.randint(0, 256, (2, 513), generator=torch.Generator().manual_seed(0)).cuda()
        inputs = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}

    def step(model):
        arguments = dict(inputs)
        return CausalLMObjective(model)(arguments.pop("input_ids"), arguments.pop("targets"), **arguments)

    operator = "litft::flash_attention_packed" if packed else "litft::flash_attention"
    report = flash_attention_step_errors(monkeypatch, config, step, operator, warmup=(step,))
    assert (report["always"]["calls"], report["never"]["calls"]) == (2, 0), report
    assert_flash_attention_as_close(report)
