"""Causal-LM loss over selected target tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from c2w.fast import llama


def next_token_targets(attention_mask: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L-1] bool: position t predicts a target, i.e. token t + 1 is real and marked in loss_mask
    (default: every real token) and token t is real."""
    att = attention_mask.bool()
    tgt = att if loss_mask is None else loss_mask.bool() & att
    return tgt[:, 1:] & att[:, :-1]


def lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
            *, fast: bool = True) -> torch.Tensor:
    """Mean next-token NLL over the targets where loss_mask is True.

    input_ids, attention_mask, loss_mask: [B, L]; loss_mask[b, t] says token t is a target
    (predicted from positions < t). Right padding. Returns a scalar.

    Llama-layout models (plain or PEFT LoRA) take the lean path: sequences packed without padding,
    the LM head and cross-entropy only at target positions, chunked, never holding [N, V] logits.
    Anything else (or fast=False) runs the model's own forward.
    """
    p = llama.plan(model) if fast else None
    if p is None:
        return _hf_loss(model, input_ids, attention_mask, loss_mask)
    att = attention_mask.bool()
    tgt = next_token_targets(attention_mask, loss_mask)
    n_real = att.sum(1)
    if not torch.equal(att, torch.arange(att.shape[1], device=att.device) < n_real[:, None]):  # not right-padded
        return _hf_loss(model, input_ids, attention_mask, loss_mask)
    lens = n_real.tolist()
    rows = input_ids.tolist()
    seqs = [rows[b][:n] for b, n in enumerate(lens) if n > 0]
    keep = [b for b, n in enumerate(lens) if n > 0]
    n_t = int(tgt.sum())
    if n_t == 0 or not seqs:
        return _hf_loss(model, input_ids, attention_mask, loss_mask)
    dev = input_ids.device
    pk = llama.pack(seqs, dev)
    h = llama.hidden(p, pk)
    start = torch.zeros(len(lens), dtype=torch.long)
    start[keep] = torch.tensor(pk.starts, dtype=torch.long)
    bi, ti = tgt.nonzero(as_tuple=True)  # predicting position (b, t) -> target token (b, t + 1)
    hs = h.index_select(0, start.to(dev)[bi] + ti)
    return llama.linear_ce(hs, p.head, input_ids[bi, ti + 1], n_t)


def _hf_loss(model, input_ids, attention_mask, loss_mask):
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = out.logits[:, :-1].float()  # [B, L-1, V]
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return (nll * mask.reshape(-1)).sum() / mask.sum().clamp(min=1)


def dense_loss(model, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum weight[b, t] * NLL(input_ids[b, t + 1] | input_ids[b, :t + 1]) / sum(weight), with no host
    sync and fixed shapes, so that it can be captured in a CUDA graph (c2w.fast.graphed).

    input_ids [B, L], right-padded; weight [B, L-1] float, 0 at pad targets and wherever no loss is
    wanted. No packing: rows stay as they are, under a plain causal mask (right padding never reaches
    a real token's keys). Llama-layout models only (llama.plan must cover the model).
    """
    p = llama.plan(model)
    if p is None:
        raise ValueError("dense_loss needs a Llama-layout model (plain or PEFT LoRA) that c2w.fast.llama covers")
    B, L = input_ids.shape
    pos = torch.arange(L, device=input_ids.device).expand(B, L)
    h = llama.hidden(p, llama.Packed(input_ids, pos, None, [], []))  # [B*L, d]
    h = h.view(B, L, -1)[:, :-1].reshape(B * (L - 1), -1)
    w = weight.reshape(-1).float()
    return llama.linear_ce(h, p.head, input_ids[:, 1:].reshape(-1), w.sum().clamp(min=1.0), weight=w)
