"""General-text drift: how far the current model's next-token distribution moved from the base."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def encode_passages(tokenizer, texts: list[str], max_tokens: int = 128) -> list[torch.Tensor]:
    return [torch.tensor(tokenizer(t, add_special_tokens=False).input_ids[:max_tokens]) for t in texts]


@torch.no_grad()
def base_logprobs(model, passages: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-passage log-softmax of the base [L, V], kept in bf16 to halve memory (KL error ~1e-3)."""
    dev = next(model.parameters()).device
    return [torch.log_softmax(model(input_ids=p[None].to(dev)).logits[0].float(), -1).to(torch.bfloat16).cpu()
            for p in passages]


@torch.no_grad()
def drift(model, passages: list[torch.Tensor], base_lp: list[torch.Tensor], on: list[bool] | None = None) -> dict[str, float]:
    """Mean per-token KL(base || current) and perplexity ratio current / base on held-out text.
    on: per passage, whether a router sends it through the learned weights; a passage routed to
    the frozen base is the base's own output (KL 0; scoring it would only measure bf16 rounding)."""
    dev = next(model.parameters()).device
    kl_sum, nll_cur, nll_base, n = 0.0, 0.0, 0.0, 0
    for i, (p, blp) in enumerate(zip(passages, base_lp)):
        blp, tgt = blp.float(), p[1:]
        base_nll = -blp[:-1].gather(1, tgt[:, None]).sum().item()
        nll_base += base_nll
        n += len(tgt)
        if on is not None and not on[i]:
            nll_cur += base_nll
            continue
        lp = torch.log_softmax(model(input_ids=p[None].to(dev)).logits[0].float(), -1).cpu()
        kl_sum += F.kl_div(lp[:-1], blp[:-1], log_target=True, reduction="sum").item()
        nll_cur -= lp[:-1].gather(1, tgt[:, None]).sum().item()
    return {"kl": kl_sum / max(n, 1), "ppl_ratio": math.exp((nll_cur - nll_base) / max(n, 1))}
