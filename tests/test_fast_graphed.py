"""The graph-capturable write step: dense_loss gives lm_loss's loss and gradients (any device), and
on CUDA a GraphedWriteStep's replays track eager steps (skipped without a GPU; run on a lent one)."""

import copy

import pytest
import torch

from c2w.fast import lm_loss, make_optimizer
from c2w.fast.loss import dense_loss, next_token_targets
from tests.test_fast import LOSS_TOL, _batch, _grad_close, _lora


@pytest.mark.parametrize("partial", [False, True])
def test_dense_loss_matches_lm_loss(tiny, partial):
    m = _lora(tiny.model)
    ids, att = _batch(len(tiny.tokenizer), tiny.tokenizer.pad_token_id)
    lm = att.bool().clone()
    if partial:
        lm[:, :5] = False
    params = [p for p in m.parameters() if p.requires_grad]
    ref = lm_loss(m, ids, att, lm)
    got = dense_loss(m, ids, next_token_targets(att, lm).float())
    assert abs(got.item() - ref.item()) <= LOSS_TOL
    _grad_close(torch.autograd.grad(got, params), torch.autograd.grad(ref, params))


def test_dense_loss_rejects_other_layouts():
    class NotLlama(torch.nn.Module):
        config = None

    with pytest.raises(ValueError, match="Llama-layout"):
        dense_loss(NotLlama(), torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 3))


def test_graphed_step_needs_cuda_and_capturable(tiny):
    from c2w.fast.graphed import GraphedWriteStep

    m = _lora(tiny.model)
    params = [p for p in m.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="CUDA"):
        GraphedWriteStep(m, params, make_optimizer(params, lr=1e-3), batch=2, seq=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_steps_track_eager_steps(tiny):
    from c2w.fast.graphed import GraphedWriteStep

    base = copy.deepcopy(tiny.model).cuda()
    a, b = _lora(base), _lora(base)
    pa = [p for p in a.parameters() if p.requires_grad]
    pb = [p for p in b.parameters() if p.requires_grad]
    oa, ob = make_optimizer(pa, lr=1e-3), make_optimizer(pb, lr=1e-3, capturable=True)
    with pytest.raises(ValueError, match="capturable"):
        GraphedWriteStep(b, pb, oa, batch=4, seq=16)
    step = GraphedWriteStep(b, pb, ob, batch=4, seq=16)  # larger than the batches: padded inside
    ids, att = _batch(len(tiny.tokenizer), tiny.tokenizer.pad_token_id)
    ids, att = ids.cuda(), att.cuda()
    for _ in range(3):
        la = lm_loss(a, ids, att, att.bool())
        la.backward()
        torch.nn.utils.clip_grad_norm_(pa, 1.0)
        oa.step()
        oa.zero_grad(set_to_none=True)
        lb = step(ids, att)
        assert abs(la.item() - lb.item()) <= 1e-4
    for x, y in zip(pa, pb):
        assert (x - y).abs().max() <= 1e-4 * x.abs().max().clamp(min=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        step(torch.zeros(5, 8, dtype=torch.long, device="cuda"), torch.ones(5, 8, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_greedy_steps_are_kept_across_calls(tiny, monkeypatch):
    """Captured greedy steps give the eager path's tokens, also when a later call reuses the capture
    after a write changed the adapter."""
    from c2w.fast import decode as D
    from c2w.fast import greedy_decode
    from tests.test_fast import PROMPTS

    base = copy.deepcopy(tiny.model).cuda()
    with torch.no_grad():  # as tests/test_fast.py's models: varied tokens within a row, not one repeated
        for p in base.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    m = _lora(base)
    mx = [5, 3, 7, 1, 6, 4, 2, 3]
    reuses = D.GRAPH_STATS["reuses"]
    D.clear_graphs()
    try:
        for change in (False, True, False):
            if change:
                with torch.no_grad():
                    for n, p in m.named_parameters():
                        if "lora_B" in n:
                            p.add_(torch.randn_like(p) * 0.05)
            monkeypatch.setattr(D, "CUDA_GRAPHS", False)
            ref = greedy_decode(m, tiny.tokenizer, PROMPTS, mx, batch_size=4)
            monkeypatch.setattr(D, "CUDA_GRAPHS", True)
            assert greedy_decode(m, tiny.tokenizer, PROMPTS, mx, batch_size=4) == ref
        assert D.GRAPH_STATS["reuses"] - reuses >= 4
    finally:
        D.clear_graphs()
