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
def drift(model, passages: list[torch.Tensor], base_lp: list[torch.Tensor]) -> dict[str, float]:
    """Mean per-token KL(base || current) and perplexity ratio current / base on held-out text."""
    dev = next(model.parameters()).device
    kl_sum, nll_cur, nll_base, n = 0.0, 0.0, 0.0, 0
    for p, blp in zip(passages, base_lp):
        lp = torch.log_softmax(model(input_ids=p[None].to(dev)).logits[0].float(), -1).cpu()
        blp = blp.float()
        kl_sum += F.kl_div(lp[:-1], blp[:-1], log_target=True, reduction="sum").item()
        tgt = p[1:]
        nll_cur -= lp[:-1].gather(1, tgt[:, None]).sum().item()
        nll_base -= blp[:-1].gather(1, tgt[:, None]).sum().item()
        n += len(tgt)
    return {"kl": kl_sum / max(n, 1), "ppl_ratio": math.exp((nll_cur - nll_base) / max(n, 1))}
