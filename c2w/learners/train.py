"""The write loop shared by the weight-writing baselines: spend a token budget on LM steps."""

from __future__ import annotations

import random
import time
from typing import Callable, Sequence

import torch

from c2w.fast import lm_loss
from c2w.learners.base import Cost, Progress


def collate(tokenizer, texts: Sequence[str], max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask [B, L] for a batch of texts."""
    tokenizer.padding_side = "right"
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_len,
                    add_special_tokens=False)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def write_texts(model, tokenizer, opt: torch.optim.Optimizer, params: list[torch.Tensor],
                sample_batch: Callable[[], list[str]], token_budget: int, max_len: int, cost: Cost,
                flops_per_token: float, progress_points: int = 0,
                extra_loss: Callable[[], tuple[torch.Tensor, int]] | None = None) -> Progress:
    """Take optimiser steps on batches from `sample_batch` until `token_budget` tokens are trained.

    Every batch's real (non-pad) tokens count, replayed ones included. Yields (steps, tokens) when
    the spent budget crosses k/(progress_points+1), k = 1..progress_points. `extra_loss()` adds a
    term to every step (a penalty, or a rehearsal loss) with the tokens it trained on (0 for a penalty).
    """
    dev = next(model.parameters()).device
    used, marks = 0, [token_budget * k / (progress_points + 1) for k in range(1, progress_points + 1)]
    while used < token_budget:
        t0 = time.perf_counter()
        batch = sample_batch()
        loss, n = torch.zeros((), device=dev), 0
        if batch:
            ids, att = collate(tokenizer, batch, max_len, dev)
            loss, n = lm_loss(model, ids, att, att.bool()), int(att.sum())
        if extra_loss is not None:
            extra, n_extra = extra_loss()
            loss, n = loss + extra, n + n_extra
        if n == 0:  # nothing to train on: stop rather than spin
            return
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        used += n
        cost.trained_tokens += n
        cost.train_steps += 1
        cost.flops += flops_per_token * n
        cost.train_s += time.perf_counter() - t0  # excludes the runner's work while we are paused
        while marks and used >= marks[0]:
            marks.pop(0)
            yield cost.train_steps, cost.trained_tokens


def epoch_sampler(texts: list[str], batch_size: int, rng: random.Random) -> Callable[[], list[str]]:
    """Batches that walk shuffled passes over `texts`, reshuffling at each pass."""
    order: list[str] = []

    def sample() -> list[str]:
        batch = []
        while len(batch) < min(batch_size, len(texts)):
            if not order:
                order.extend(rng.sample(texts, len(texts)))
            batch.append(order.pop())
        return batch

    return sample
