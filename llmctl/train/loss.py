"""Language-modelling loss: cross-entropy with optional label smoothing and z-loss on the logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def language_model_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimise, plain cross-entropy to report); both are means over non-ignored tokens."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_targets = targets.reshape(-1)
    cross_entropy = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index)
    loss = cross_entropy
    if label_smoothing:
        loss = F.cross_entropy(
            flat_logits, flat_targets, ignore_index=ignore_index, label_smoothing=label_smoothing
        )
    if z_loss:
        # PaLM's z-loss keeps log Z (the softmax normaliser) near 0, which stabilises large-vocab training.
        keep = flat_targets != ignore_index
        log_z = torch.logsumexp(flat_logits[keep], dim=-1)
        loss = loss + z_loss * log_z.pow(2).mean()
    return loss, cross_entropy.detach()
