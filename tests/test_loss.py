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

    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * 50 * 7)  # force several chunks of 7 positions
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

    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * 50 * 5)
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
