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


Row = tuple[float, float, float, int]  # per passage: summed KL(base || current), current NLL, base NLL, tokens


@torch.no_grad()
def drift_rows(model, passages: list[torch.Tensor], base_lp: list[torch.Tensor], on: list[bool] | None = None) -> list[Row]:
    """Per passage, what `drift` sums. A passage with on[i] False is not run: the frozen base
    answers it, so its row is (0, base NLL, base NLL, tokens)."""
    dev = next(model.parameters()).device
    rows: list[Row] = []
    for i, (p, blp) in enumerate(zip(passages, base_lp)):
        blp, tgt = blp.float(), p[1:]
        base_nll = -blp[:-1].gather(1, tgt[:, None]).sum().item()
        if on is not None and not on[i]:
            rows.append((0.0, base_nll, base_nll, len(tgt)))
            continue
        lp = torch.log_softmax(model(input_ids=p[None].to(dev)).logits[0].float(), -1).cpu()
        kl = F.kl_div(lp[:-1], blp[:-1], log_target=True, reduction="sum").item()
        rows.append((kl, -lp[:-1].gather(1, tgt[:, None]).sum().item(), base_nll, len(tgt)))
    return rows


def summarise_drift(rows: list[Row], on: list[bool] | None = None) -> dict[str, float]:
    """Mean per-token KL and perplexity ratio over passages; with `on`, the rows of passages routed
    to the frozen base count as the base's own output (one forward pass serves routed and unrouted)."""
    kl_sum, nll_cur, nll_base, n = 0.0, 0.0, 0.0, 0
    for i, (kl, cur, base, m) in enumerate(rows):
        if on is not None and not on[i]:
            kl, cur = 0.0, base
        kl_sum, nll_cur, nll_base, n = kl_sum + kl, nll_cur + cur, nll_base + base, n + m
    return {"kl": kl_sum / max(n, 1), "ppl_ratio": math.exp((nll_cur - nll_base) / max(n, 1))}


def drift(model, passages: list[torch.Tensor], base_lp: list[torch.Tensor], on: list[bool] | None = None) -> dict[str, float]:
    """Mean per-token KL(base || current) and perplexity ratio current / base on held-out text.
    on: per passage, whether a router sends it through the learned weights; a passage routed to
    the frozen base is the base's own output (KL 0; scoring it would only measure bf16 rounding)."""
    return summarise_drift(drift_rows(model, passages, base_lp, on), on)
