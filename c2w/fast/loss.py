"""Causal-LM loss over selected target tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the targets where loss_mask is True.

    input_ids, attention_mask, loss_mask: [B, L]; loss_mask[b, t] says token t is a target
    (predicted from positions < t). Right padding. Returns a scalar.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = out.logits[:, :-1].float()  # [B, L-1, V]
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:] & attention_mask[:, 1:].bool()
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return (nll * mask.reshape(-1)).sum() / mask.sum().clamp(min=1)
