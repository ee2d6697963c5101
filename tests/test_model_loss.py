"""The fused LM-head cross-entropy equals the plain logits -> F.cross_entropy computation, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmctl.model import loss as fused_loss
from llmctl.model.loss import linear_cross_entropy


def reference(hidden, weight, targets, label_smoothing, z_loss):
    logits = (hidden @ weight.t()).float().reshape(-1, weight.shape[0])
    flat = targets.reshape(-1)
    cross_entropy = F.cross_entropy(logits, flat)
    loss = F.cross_entropy(logits, flat, label_smoothing=label_smoothing)
    keep = flat != -100
    loss = loss + z_loss * torch.logsumexp(logits[keep], -1).pow(2).mean()
    return loss, cross_entropy


@pytest.mark.parametrize(("label_smoothing", "z_loss"), [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.1, 1e-3)])
def test_fused_loss_matches_reference_in_value_and_gradient(monkeypatch, label_smoothing, z_loss):
    monkeypatch.setitem(fused_loss.CHUNK_BYTES, "cpu", 4 * 97 * 5)  # 5-row chunks: exercise the chunk loop
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (3, 11))
    targets[0, :4] = -100
    ours = linear_cross_entropy(hidden, weight, targets, label_smoothing=label_smoothing, z_loss=z_loss)
    theirs = reference(hidden, weight, targets, label_smoothing, z_loss)
    torch.testing.assert_close(ours[1], theirs[1])
    torch.testing.assert_close(ours[0], theirs[0])
    grads = torch.autograd.grad(2.5 * ours[0], (hidden, weight))
    expected = torch.autograd.grad(2.5 * theirs[0], (hidden, weight))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_computes_none():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8)  # frozen, as a LoRA base head would be
    loss, _ = linear_cross_entropy(hidden, weight, torch.randint(0, 10, (4,)))
    (grad,) = torch.autograd.grad(loss, (hidden,))
    assert grad.shape == hidden.shape
    with torch.no_grad():
        loss, ce = linear_cross_entropy(hidden, weight, torch.randint(0, 10, (4,)))
    assert not loss.requires_grad and torch.isfinite(ce)


def test_model_forward_with_targets_equals_logits_cross_entropy():
    from llmctl.model import ModelConfig, Transformer

    torch.manual_seed(1)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, tie_embeddings=True))
    ids = torch.randint(0, 64, (2, 9))
    loss, cross_entropy = model(ids[:, :-1], targets=ids[:, 1:])
    expected = F.cross_entropy(model(ids[:, :-1]).reshape(-1, 64), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(cross_entropy, expected)
    torch.testing.assert_close(loss, expected)


def test_document_masking_makes_each_document_see_only_itself():
    from llmctl.model import ModelConfig, Transformer
    from llmctl.model.transformer import document_ids_of

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layer=2, n_head=4, max_seq_len=32)).eval()
    eos = 2
    first, second = torch.randint(3, 50, (9,)), torch.randint(3, 50, (11,))
    window = torch.cat([first, torch.tensor([eos]), second])[None]
    with torch.no_grad():
        masked = model(window, document_ids=document_ids_of(window, eos))[0, 10:]
        alone = model(second[None])[0]
        unmasked = model(window)[0, 10:]
    # rotary positions are relative, so the second document scores as if it began the window
    torch.testing.assert_close(masked, alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(unmasked, alone, atol=1e-3)  # without the mask it sees the first document
