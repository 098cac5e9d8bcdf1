"""Greedy decoding and teacher-forced answer log-probabilities for probe scoring."""

from __future__ import annotations

import torch


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield range(i, min(n, i + size))


@torch.no_grad()
def greedy_decode(model, tokenizer, prompts: list[str], max_new_tokens: list[int], batch_size: int = 32) -> list[list[int]]:
    """Greedy continuation token ids for each prompt, item k cut at max_new_tokens[k] tokens.

    Left-pads each batch so that every prompt ends at the same position. Stops a row at EOS.
    """
    dev = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    tokenizer.padding_side = "left"
    for idx in _batches(len(prompts), batch_size):
        enc = tokenizer([prompts[k] for k in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
        n_new = max(max_new_tokens[k] for k in idx)
        gen = model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        for row, k in enumerate(idx):
            ids = gen[row, enc.input_ids.shape[1]:].tolist()
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            out[k] = ids[: max_new_tokens[k]]
    tokenizer.padding_side = "right"
    return out


def answer_token_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the answer as it continues the prompt (with a leading space
    unless the prompt ends in whitespace), split where the joint tokenisation diverges."""
    sep = "" if prompt[-1:].isspace() else " "
    p = tokenizer(prompt, add_special_tokens=False).input_ids
    full = tokenizer(prompt + sep + answer, add_special_tokens=False).input_ids
    n = 0
    while n < min(len(p), len(full)) and p[n] == full[n]:
        n += 1
    return full[:n], full[n:]


@torch.no_grad()
def answer_logprobs(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 32) -> list[float]:
    """Mean per-token log p(answer | prompt) under teacher forcing, one float per probe."""
    dev = next(model.parameters()).device
    pairs = [answer_token_ids(tokenizer, p, a) for p, a in zip(prompts, answers)]
    res: list[float] = []
    for idx in _batches(len(pairs), batch_size):
        seqs = [pairs[k][0] + pairs[k][1] for k in idx]
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(seqs), L), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            att[r, : len(s)] = 1
        logp = torch.log_softmax(model(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits.float(), -1)
        for r, k in enumerate(idx):
            n_p, ans = len(pairs[k][0]), pairs[k][1]
            pos = torch.arange(n_p - 1, n_p - 1 + len(ans), device=dev)
            res.append(logp[r, pos, torch.tensor(ans, device=dev)].mean().item())
    return res
