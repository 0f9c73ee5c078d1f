import pytest
import torch
import torch.nn.functional as F
from torch import nn

from litft.training.loss import causal_lm_loss


def reference(hidden, targets, weight, softcap=None):
    logits = (hidden @ weight.t()).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("train_head", [False, True])
def test_fused_chunked_loss_and_gradients_match_full_logits(monkeypatch, softcap, train_head):
    import litft.training.loss as loss_module

    monkeypatch.setattr(loss_module, "chunk_size_for", lambda vocab_size, element_size=2: 7)  # several chunks
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False).double()
    head.weight.requires_grad_(train_head)
    hidden = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (3, 11))
    targets[0, :4] = -100
    targets[2, -3:] = -100

    ours = causal_lm_loss(hidden, targets, head, head, softcap)
    ours.backward()
    grads = (hidden.grad.clone(), head.weight.grad.clone() if train_head else None)
    hidden.grad = None
    head.weight.grad = None
    ref = reference(hidden, targets, head.weight, softcap)
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], hidden.grad, rtol=1e-5, atol=1e-6)
    if train_head:
        torch.testing.assert_close(grads[1], head.weight.grad, rtol=1e-5, atol=1e-6)


def test_per_position_losses_through_a_non_linear_head(monkeypatch):
    import litft.training.loss as loss_module

    monkeypatch.setattr(loss_module, "chunk_size_for", lambda vocab_size, element_size=2: 5)
    torch.manual_seed(1)
    head = nn.Sequential(nn.Linear(16, 50, bias=False)).double()
    head.weight = head[0].weight  # the chunk-size lookup reads .weight
    hidden = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9))
    targets[1, :3] = -100
    per_position = causal_lm_loss(hidden, targets, head, head, reduction="none")
    logits = head(hidden).float()
    expected = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    torch.testing.assert_close(per_position.double(), expected.double(), rtol=1e-6, atol=1e-6)
    per_position.sum().backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    expected.sum().backward()
    torch.testing.assert_close(grad, hidden.grad)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_compiled_loss_chunk_equals_eager(softcap):
    """On GPUs the chunk's loss and gradient run as a torch.compile'd kernel; it must compute the same values."""
    from litft.training.loss import cross_entropy_chunk

    torch.manual_seed(0)
    logits = torch.randn(37, 300) * 4
    targets = torch.randint(0, 300, (37,))
    compiled = torch.compile(cross_entropy_chunk, dynamic=True)
    loss, grad = compiled(logits, targets, softcap)
    expected_loss, expected_grad = cross_entropy_chunk(logits, targets, softcap)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    # and both are the cross-entropy and its gradient
    reference_logits = logits.clone().requires_grad_(True)
    capped = reference_logits if softcap is None else torch.tanh(reference_logits / softcap) * softcap
    reference = F.cross_entropy(capped, targets, reduction="sum")
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, reference_logits.grad, rtol=1e-4, atol=1e-6)


def test_fused_loss_under_autocast_matches_float32():
    """--precision bf16-mixed: float32 hidden states and head, bf16 matmuls inside autocast."""
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = causal_lm_loss(hidden, targets, head, head)
    loss.backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    reference(hidden, targets, head.weight).backward()
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, hidden.grad, rtol=0.05, atol=0.01)


@pytest.fixture
def interpreted_cross_entropy_kernel(monkeypatch):
    from conftest import triton_interpreter

    from litft.training import cross_entropy_kernel

    with triton_interpreter(monkeypatch, cross_entropy_kernel._kernel):
        monkeypatch.setattr(cross_entropy_kernel, "BLOCK", 64)  # several blocks per row, a padded last one
        monkeypatch.setattr(cross_entropy_kernel, "PROGRAMS_PER_MULTIPROCESSOR", 1)  # 4 programs: rows outnumber them
        yield cross_entropy_kernel


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_kernel_equals_the_tensor_code(interpreted_cross_entropy_kernel, softcap, dtype):
    """The Triton kernel (Triton's interpreter on CPU): the chunk's summed loss and its gradient, written over the
    logits, equal `cross_entropy_chunk`'s; rows outnumber the programs, and a row's largest logit sits in the
    padded last block."""
    from litft.training.loss import cross_entropy_chunk

    torch.manual_seed(0)
    rows, vocab = 9, 300  # 300 = 4 blocks of 64 and a last one of 44
    logits = (torch.randn(rows, vocab) * 4).to(dtype)
    logits[0, 299] = 40.0
    targets = torch.randint(0, vocab, (rows,))
    targets[1] = vocab - 1
    expected_loss, expected_grad = cross_entropy_chunk(logits, targets, softcap)
    in_place = logits.clone()
    loss, grad = interpreted_cross_entropy_kernel.cross_entropy_in_place(in_place, targets, softcap)
    assert grad.data_ptr() == in_place.data_ptr() and grad.dtype == dtype
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-4)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, **tolerance)


def test_the_loss_runs_through_the_kernel_where_it_can(interpreted_cross_entropy_kernel, monkeypatch):
    """causal_lm_loss's chunks go through the kernel (CPU tensors under the interpreter count as ones it takes) and
    give full-logit cross-entropy's loss and gradients; LITFT_CROSS_ENTROPY=compiled keeps it out."""
    import litft.training.loss as loss_module

    calls = []
    kernel = interpreted_cross_entropy_kernel.cross_entropy_in_place
    monkeypatch.setattr(interpreted_cross_entropy_kernel, "cross_entropy_in_place",
                        lambda *arguments: calls.append(1) or kernel(*arguments))
    monkeypatch.setattr(loss_module, "chunk_size_for", lambda vocab_size, element_size=2: 3)
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 9))
    targets[0, :2] = -100
    loss = causal_lm_loss(hidden, targets, head, head)
    loss.backward()
    assert len(calls) == 6  # 16 trained positions in chunks of 3 rows
    reference_hidden = hidden.detach().clone().requires_grad_(True)
    reference = F.cross_entropy(head(reference_hidden).reshape(-1, 50), targets.reshape(-1), reduction="sum")
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, reference_hidden.grad, rtol=1e-5, atol=1e-6)
    calls.clear()
    monkeypatch.setenv("LITFT_CROSS_ENTROPY", "compiled")
    causal_lm_loss(hidden, targets, head, head)
    assert not calls


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_on_the_gpu_the_cross_entropy_kernel_equals_the_compiled_loss(softcap):
    """On a GPU, a 128k vocabulary as llama-3's: the kernel's loss and bf16 gradient against the compiled tensor
    code's (the path it replaced), and float32 cross-entropy's."""
    from litft.training import cross_entropy_kernel
    from litft.training.loss import cross_entropy_chunk

    torch.manual_seed(0)
    logits = (torch.randn(2048, 128256, device="cuda") * 3).to(torch.bfloat16)
    targets = torch.randint(0, 128256, (2048,), device="cuda")
    compiled_loss, compiled_grad = torch.compile(cross_entropy_chunk, dynamic=True)(logits, targets, softcap)
    reference_logits = logits.float().requires_grad_(True)
    capped = reference_logits if softcap is None else torch.tanh(reference_logits / softcap) * softcap
    reference = F.cross_entropy(capped, targets, reduction="sum")
    reference.backward()
    loss, grad = cross_entropy_kernel.cross_entropy_in_place(logits, targets, softcap)
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(loss, compiled_loss, rtol=1e-5, atol=1e-2)
    assert (grad.float() - compiled_grad.float()).abs().max() <= 2 * (compiled_grad.float() - reference_logits.grad).abs().max()
