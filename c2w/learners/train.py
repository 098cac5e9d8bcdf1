"""The write loop shared by the weight-writing baselines: spend a token budget on LM steps."""

from __future__ import annotations

import contextlib
import random
import time
from typing import Callable, Sequence

import torch

from c2w.fast import lm_loss, llama
from c2w.learners.base import Cost, Progress


def collate(tokenizer, texts: Sequence[str], max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask [B, L] for a batch of texts."""
    tokenizer.padding_side = "right"
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_len,
                    add_special_tokens=False)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


_ENDS = set(".!?。！？")
_CJK_ENDS = set("。！？")  # need no space after them


def windows(tokenizer, texts: Sequence[str], max_len: int) -> list[str]:
    """Each text as consecutive windows of at most `max_len` tokens, in order, so a write step
    (which keeps a text's first `max_len` tokens) reaches all of it. A text that fits stays
    whole, untouched. A longer one is cut at a token boundary, moved back to the last sentence
    end (or line break) in the window's second half when there is one, so a sentence is rarely
    split; the pieces together hold the whole text but the whitespace at the cuts."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    out: list[str] = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False).input_ids
        n = len(ids)
        if n <= max_len:
            out.append(t)
            continue
        if not getattr(tokenizer, "is_fast", False):  # no offsets (a slow tokenizer): decoded token runs
            out += [p for k in range(0, n, max_len) if (p := tokenizer.decode(ids[k:k + max_len]).strip())]
            continue
        starts = [a for a, _ in tokenizer(t, add_special_tokens=False, return_offsets_mapping=True).offset_mapping]
        i = 0
        while i < n:
            j = min(i + max_len, n)
            if j < n:
                j = next((k for k in range(j, i + max_len // 2, -1) if _starts_sentence(t, starts, k)), j)
                while j > i + 1 and starts[j] == starts[j - 1]:  # never inside a character of several byte tokens
                    j -= 1
            piece = (t[starts[i]:starts[j]] if j < n else t[starts[i]:]).strip()
            if piece:
                out.append(piece)
            i = j
    return out


def _starts_sentence(t: str, starts: list[int], k: int) -> bool:
    """Token k starts a sentence: the token before it ends in . ! ? followed by a space (not "11.5"
    or "example.com"), or in a CJK full stop, or a line break comes between them."""
    before, first = t[starts[k - 1]:starts[k]], t[starts[k]:starts[k] + 1]
    end = before.rstrip()[-1:]
    spaced = before[-1:].isspace() or first.isspace()
    return (end in _ENDS and (spaced or end in _CJK_ENDS)) or "\n" in before or first == "\n"


# Below this many passes over the text a learner observes, `c2w bench` and `c2w learn` warn. The
# built-in stream's quick preset gives 16-20; on the dev passages (examples/passages.jsonl) c2w learned almost nothing at
# 4-6 passes (learning accuracy 0.037) and 0.250 at four times that (BENCHMARKS.md, session 16).
MIN_PASSES = 8


def thin_budget(token_budget: int, tokens: int, flag: str) -> str | None:
    """What to tell a user whose budget goes over `tokens` of text fewer than MIN_PASSES times."""
    if not tokens or token_budget >= MIN_PASSES * tokens:
        return None
    return (f"the token budget ({token_budget}) covers {token_budget / tokens:.1f} passes over {tokens} tokens of "
            f"observed text; below {MIN_PASSES}, a learner sees each text a few times at most and learns little "
            f"of it. For {2 * MIN_PASSES} passes: {flag} {round(2 * MIN_PASSES * tokens, -2):.0f}.")


def write_texts(model, tokenizer, opt: torch.optim.Optimizer, params: list[torch.Tensor],
                sample_batch: Callable[[], list[str]], token_budget: int, max_len: int, cost: Cost,
                flops_per_token: float, progress_points: int = 0,
                extra_loss: Callable[[int], tuple[torch.Tensor, int]] | None = None, part: str = "train",
                marks: Sequence[float] | None = None, bf16: bool = False) -> Progress:
    """Take optimiser steps on batches from `sample_batch` until `token_budget` tokens are trained.

    Every batch's real (non-pad) tokens count, replayed ones included, and the last batch is cut so
    that the budget is never exceeded (methods compared at one budget spend the same tokens). Yields
    (steps, tokens) when the spent budget crosses k/(progress_points+1), k = 1..progress_points, or
    the token counts in `marks` when given.
    `extra_loss(left)` adds a term to every step (a penalty, or a rehearsal loss) with the tokens it
    trained on (0 for a penalty), at most `left`, the budget still unspent. Its FLOPs count under
    `part` in `cost.flops_by`.
    `bf16` (CPU only): the forward runs under bf16 autocast (matmuls in bf16; parameters, gradients
    and optimizer state stay fp32).
    """
    dev = next(model.parameters()).device
    cpu_bf16 = bf16 and dev.type == "cpu"
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if cpu_bf16 else contextlib.nullcontext()
    used = 0
    marks = sorted(marks) if marks is not None else [token_budget * k / (progress_points + 1)
                                                       for k in range(1, progress_points + 1)]
    with llama.step_cache():  # kept across this loop's steps: frozen weights' casts, the loss's scratch
        while used < token_budget:
            t0 = time.perf_counter()
            loss, n = torch.zeros((), device=dev), 0
            with amp:
                if extra_loss is not None:
                    loss, n = extra_loss(token_budget - used)
                batch = sample_batch()
                if batch:
                    ids, att = fit_budget(*collate(tokenizer, batch, max_len, dev), token_budget - used - n)
                    if len(ids):
                        loss, n = loss + lm_loss(model, ids, att, att.bool()), n + int(att.sum())
            if n == 0:  # nothing to train on (or no budget left for even one token): stop rather than spin
                return
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            used += n
            cost.trained_tokens += n
            cost.train_steps += 1
            cost.add(flops_per_token * n, part)
            cost.train_s += time.perf_counter() - t0  # excludes the runner's work while we are paused
            while marks and used >= marks[0]:
                marks.pop(0)
                yield cost.train_steps, cost.trained_tokens


def fit_budget(ids: torch.Tensor, att: torch.Tensor, left: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch [B, L] cut to at most `left` real tokens: earlier rows whole, then the
    head of one row; rows left empty are dropped."""
    if int(att.sum()) <= left:
        return ids, att
    att = att * (torch.cumsum(att.flatten(), 0).view_as(att) <= max(left, 0))  # row-major order
    rows = att.sum(1) > 0
    return ids[rows], att[rows]


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
