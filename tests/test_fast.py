"""The fast paths give the plain transformers (+ PEFT) numbers: loss and gradients, greedy tokens,
answer log-probs, on the tiny model, plain and with LoRA adapters, with padding and ragged lengths.

Tolerances (fp32 on CPU): loss |diff| <= 1e-5, gradients max |diff| <= 1e-4 x max |grad|,
log-probs |diff| <= 1e-4 nats, greedy token ids identical.
"""

import contextlib
import copy
import dataclasses
import weakref

import pytest
import torch

from c2w.fast import answer_logprobs, decode_and_logprobs, greedy_decode, lm_loss, make_optimizer
from c2w.fast import decode as D
from c2w.fast import llama

LOSS_TOL = 1e-5
GRAD_RTOL = 1e-4
LP_TOL = 1e-4

PROMPTS = ["Tulkil is a town on the river", "Question: Which river flows through Tulkil?\nAnswer:",
           "By profession, Skolkusk Fodarn is a", "The capital of", "The answer is ", "Her brother wrote",
           "In 1887 the old stone bridge over the valley was rebuilt by the people of the market town", "A"]
ANSWERS = ["Dernoln", "Dernoln", "botanist", "France", "Paris", "books about ships", "1887", "cat"]


def _lora(model, names=("default",), seed=0, std=0.05, **kw):
    """A PEFT model with non-zero B so that each adapter changes the outputs."""
    from peft import LoraConfig, get_peft_model

    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    cfg.update(kw)
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(**cfg), adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, LoraConfig(**cfg))
    if len(names) > 1:
        pm.base_model.set_adapter(list(names))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, std)
    return pm


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small ops on a shared 2-core machine: one thread is steadier and faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tiny):
    base = copy.deepcopy(tiny.model)
    with torch.no_grad():  # larger weights than the default init: varied greedy outputs (at 3x the tied
        # embedding made most rows repeat their first token, which hid errors in feeding tokens back)
        for p in base.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return {"plain": base, "lora": _lora(base), "two-adapters": _lora(base, ("first", "second"), seed=1)}


def _batch(vocab, pad):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    att = torch.ones_like(ids)
    att[1, 7:] = 0
    att[2, 3:] = 0
    att[3, 11:] = 0
    return ids.masked_fill(att == 0, pad), att


def _grad_close(ga, gb):
    for a, b in zip(ga, gb):
        assert (a - b).abs().max() <= GRAD_RTOL * b.abs().max().clamp(min=1e-8)


@pytest.mark.parametrize("kind", ["plain", "lora", "two-adapters"])
def test_lm_loss_matches_hf_labels_loss(models, tiny, kind):
    m = models[kind]
    assert llama.plan(m) is not None
    ids, att = _batch(len(tiny.tokenizer), tiny.tokenizer.pad_token_id)
    labels = ids.masked_fill(att == 0, -100)
    ref = m(input_ids=ids, attention_mask=att, labels=labels).loss
    got = lm_loss(m, ids, att, att.bool())
    assert abs(got.item() - ref.item()) <= LOSS_TOL
    params = [p for p in m.parameters() if p.requires_grad]
    if params:
        _grad_close(torch.autograd.grad(got, params), torch.autograd.grad(ref, params))


def test_lm_loss_partial_targets_and_full_ft(tiny):
    ids, att = _batch(len(tiny.tokenizer), tiny.tokenizer.pad_token_id)
    lm = att.bool().clone()
    lm[:, :5] = False  # only the tail of each text is a target
    m = copy.deepcopy(tiny.model).requires_grad_(True)  # full fine-tuning: base and tied embedding train
    params = list(m.parameters())
    ref = lm_loss(m, ids, att, lm, fast=False)
    got = lm_loss(m, ids, att, lm)
    assert abs(got.item() - ref.item()) <= LOSS_TOL
    _grad_close(torch.autograd.grad(got, params), torch.autograd.grad(ref, params))


def test_cpu_bf16_autocast_casts_frozen_weights_once_with_the_same_numbers(models, tiny):
    """Inside step_cache(), under CPU bf16 autocast, frozen weights come cast once: the loss and the
    LoRA gradients equal autocast's own casts bit for bit; a weight changed in place, even through
    `.data` (as PEFT merges do), is cast again; outside the block nothing is kept."""
    ids, att = _batch(len(tiny.tokenizer), tiny.tokenizer.pad_token_id)
    m = copy.deepcopy(models["lora"])
    q = m.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    params = [p for p in m.parameters() if p.requires_grad]

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(m, ids, att, att.bool())
        return loss.item(), torch.autograd.grad(loss, params)

    ref, gref = run()  # no cache: autocast casts at every use
    assert llama._LOWP is None
    with llama.step_cache():
        got, g = run()
        assert id(q) in llama._LOWP and llama._LOWP[id(q)][2].dtype == torch.bfloat16  # this model's q/k/v, cached
        assert run()[0] == got  # served from the cache
        with torch.no_grad():
            q.mul_(2.0)  # an in-place change (the version counter moves): cast again
        doubled = run()[0]
    assert got == ref and all(torch.equal(a, b) for a, b in zip(g, gref))
    assert llama._LOWP is None  # forgotten at exit
    assert doubled == run()[0] != ref
    q.data.mul_(0.5)  # as PEFT merges write: through .data, which no counter sees; outside any block
    with llama.step_cache():
        assert run()[0] == ref  # a new block casts afresh


def test_fp32_write_loop_concatenates_frozen_weights_once(models, tiny):
    """Inside step_cache(), in fp32, a group's frozen weights (q/k/v, gate/up) come concatenated once
    per write loop: the same loss and gradients bit for bit; an in-place change concatenates again."""
    ids, att = _batch(len(tiny.tokenizer), tiny.tokenizer.pad_token_id)
    m = copy.deepcopy(models["lora"])
    q = m.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    params = [p for p in m.parameters() if p.requires_grad]

    def run():
        loss = lm_loss(m, ids, att, att.bool())
        return loss.item(), torch.autograd.grad(loss, params)

    ref, gref = run()
    with llama.step_cache():
        got, g = run()
        kept = llama._LOWP[id(q)][2]
        assert kept.dtype == torch.float32 and run()[0] == got and llama._LOWP[id(q)][2] is kept
        with torch.no_grad():
            q.mul_(2.0)
        doubled = run()[0]
        assert llama._LOWP[id(q)][2] is not kept
        with torch.no_grad():
            q.mul_(0.5)
    assert got == ref and all(torch.equal(a, b) for a, b in zip(g, gref)) and doubled != ref


def _plain_ce(h, W, t, denom, chunk, wt):
    """linear_ce's forward as the plain ops it replaces: (loss, dh, dW)."""
    total, dh, dW = 0.0, torch.empty_like(h), torch.zeros_like(W, dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        hc, tc, wc = h[i:i + chunk], t[i:i + chunk], None if wt is None else wt[i:i + chunk]
        z = (hc @ W.t()).float()
        lse = torch.logsumexp(z, -1)
        nll = lse - z.gather(1, tc[:, None]).squeeze(1)
        total = total + (nll if wc is None else nll * wc).sum()
        z.sub_(lse[:, None]).exp_()
        z[torch.arange(len(tc)), tc] -= 1.0
        g = (z.div_(denom) if wc is None else z.mul_(wc[:, None] / denom)).to(h.dtype)
        dh[i:i + chunk] = g @ W
        dW.addmm_(g.t().float(), hc.float())
    return total / denom, dh, dW.to(W.dtype)


@pytest.mark.parametrize("case", ["fp32", "autocast-fp32-h", "autocast-bf16-h"])
@pytest.mark.parametrize("cached", [False, True])
def test_linear_ce_is_the_plain_ops_bit_for_bit(case, cached, monkeypatch):
    """The loss's ops, written into kept scratch buffers inside step_cache(), give the plain ops'
    loss and gradients bit for bit: fp32, and under CPU bf16 autocast with fp32 or bf16 hidden
    states; weighted, in uneven chunks, for h and a trainable W; a second call (reusing the buffers,
    and a smaller last chunk) too; nothing is kept after the block. (With MKL's products: oneDNN's,
    which fp32 takes by default, are held to fp32 rounding in the next test.)"""
    monkeypatch.setattr(llama, "DNN", False)
    g = torch.Generator().manual_seed(0)
    N, d, V = 23, 16, 300
    h0 = torch.randn(N, d, generator=g).to(torch.bfloat16 if case == "autocast-bf16-h" else torch.float32)
    W0 = torch.randn(V, d, generator=g) * 0.3
    t, wt = torch.randint(0, V, (N,), generator=g), torch.rand(N, generator=g)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case != "fp32")
    with amp:
        ref = [_plain_ce(h0, W0, t, 7.0, 10, w) for w in (wt, None)]
    with llama.step_cache() if cached else contextlib.nullcontext():
        for (loss_ref, dh_ref, dW_ref), w in zip(ref, (wt, None)):
            h, W = h0.clone().requires_grad_(), W0.clone().requires_grad_()
            with amp:
                loss = llama.linear_ce(h, llama.Lin(W, None, None, None), t, 7.0, chunk=10, weight=w)
            loss.backward()
            assert torch.equal(loss.detach(), loss_ref)
            assert torch.equal(h.grad, dh_ref) and torch.equal(W.grad, dW_ref)
        assert (llama._SCRATCH is not None and set(llama._SCRATCH) == {"z", "t"}) == cached
    assert llama._SCRATCH is None


def test_linear_ce_through_onednn_is_the_plain_ops_within_rounding(monkeypatch):
    """In fp32 on the CPU the loss's two products run through oneDNN: the plain ops' loss and gradients
    within fp32 rounding, and oneDNN is really what ran (forward logits and dh, chunk by chunk)."""
    g = torch.Generator().manual_seed(0)
    N, d, V = 23, 16, 300
    h0, W0 = torch.randn(N, d, generator=g), torch.randn(V, d, generator=g) * 0.3
    t, wt = torch.randint(0, V, (N,), generator=g), torch.rand(N, generator=g)
    calls = []
    lp = llama._lp
    monkeypatch.setattr(llama, "_lp", lambda *a: calls.append(1) or lp(*a))
    loss_ref, dh_ref, _ = _plain_ce(h0, W0, t, 7.0, 10, wt)
    h = h0.clone().requires_grad_()
    loss = llama.linear_ce(h, llama.Lin(W0, None, None, None), t, 7.0, chunk=10, weight=wt)
    loss.backward()
    assert len(calls) == 6  # 3 chunks x (logits, dh)
    assert abs(loss.item() - loss_ref.item()) <= 1e-6 * abs(loss_ref.item())
    assert torch.allclose(h.grad, dh_ref, rtol=1e-5, atol=1e-6 * dh_ref.abs().max())


@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_is_f_linear_forward_and_backward(bias, monkeypatch):
    """llama.linear (oneDNN for fp32 CPU tensors) gives F.linear's output and gradients for x, W and b
    within fp32 rounding, on 3-D inputs, and for W alone (x needing none); under inference mode it calls
    oneDNN once; under autocast, while compiling, and for an empty input it is F.linear's product; a
    backward that records a graph gives second derivatives."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x0, W0 = torch.randn(3, 37, 64, generator=g), torch.randn(96, 64, generator=g) * 0.1
    b0 = torch.randn(96, generator=g) if bias else None
    gy = torch.randn(3, 37, 96, generator=g)
    calls = []
    lp = llama._lp
    monkeypatch.setattr(llama, "_lp", lambda *a: calls.append(1) or lp(*a))
    outs = []
    for fn in (llama.linear, F.linear):
        x, W = x0.clone().requires_grad_(), W0.clone().requires_grad_()
        b = None if b0 is None else b0.clone().requires_grad_()
        y = fn(x, W, b)
        y.backward(gy)
        outs.append([y.detach(), x.grad, W.grad] + ([b.grad] if bias else []))
    assert len(calls) == 3  # forward, dx, dW
    for a, r in zip(*outs):
        assert a.shape == r.shape and torch.allclose(a, r, rtol=1e-5, atol=1e-5 * r.abs().max())
    W = W0.clone().requires_grad_()  # only W trains (x is frozen)
    llama.linear(x0, W, b0).backward(gy)
    assert len(calls) == 5 and torch.allclose(W.grad, outs[1][2], rtol=1e-5, atol=1e-5 * outs[1][2].abs().max())
    with torch.inference_mode():
        y = llama.linear(x0, W0, b0)
    assert len(calls) == 6 and torch.allclose(y, outs[1][0], rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = llama.linear(x0, W0, b0)
    assert len(calls) == 6 and y.dtype == torch.bfloat16
    with monkeypatch.context() as mp:
        mp.setattr(torch.compiler, "is_compiling", lambda: True)  # (Inductor cannot lower the op)
        llama.linear(x0, W0, b0)
    W = W0.clone().requires_grad_()
    assert llama.linear(x0[:, :0], W).shape == (3, 0, 96) and len(calls) == 6
    assert llama.linear(x0, W0, b0) is not None and len(calls) == 7  # (the spy still counts)
    x = x0.clone().requires_grad_()  # second derivatives: d/dW of |dL/dx|^2
    gx, = torch.autograd.grad((llama.linear(x, W) * gy).sum(), x, create_graph=True)
    gx.square().sum().backward()
    x2, W2 = x0.clone().requires_grad_(), W0.clone().requires_grad_()
    gx2, = torch.autograd.grad((F.linear(x2, W2) * gy).sum(), x2, create_graph=True)
    gx2.square().sum().backward()
    assert torch.allclose(W.grad, W2.grad, rtol=1e-4, atol=1e-4 * W2.grad.abs().max()) and W2.grad.abs().max() > 0


def test_fp32_write_step_runs_through_onednn_and_matches_mkl(models, tiny, monkeypatch):
    """The fp32 write step's frozen products (blocks and head, forward and backward) run through
    oneDNN, with MKL's loss and LoRA gradients to the module's tolerances."""
    ids, att = _batch(len(tiny.tokenizer), tiny.tokenizer.pad_token_id)
    m = copy.deepcopy(models["lora"])
    params = [p for p in m.parameters() if p.requires_grad]
    calls = []
    lp = llama._lp
    monkeypatch.setattr(llama, "_lp", lambda *a: calls.append(1) or lp(*a))

    def run():
        loss = lm_loss(m, ids, att, att.bool())
        return loss.item(), torch.autograd.grad(loss, params)

    got, g = run()
    n_layers = len(m.get_base_model().model.layers)
    # each block's 4 products and the head, forward and dx (but the first q/k/v's: its input needs none),
    # and each group's x A^T (`_LoraLinear`)
    assert len(calls) == 2 * (4 * n_layers + 1) - 1 + 4 * n_layers
    monkeypatch.setattr(llama, "DNN", False)
    calls.clear()
    ref, gref = run()
    assert not calls and abs(got - ref) <= LOSS_TOL
    assert all((a - b).abs().max() <= GRAD_RTOL * b.abs().max() for a, b in zip(g, gref))


@pytest.mark.parametrize("masked", [False, True])
def test_attend_math_matches_sdpa(masked, monkeypatch):
    """The matmul attention (used on the CPU in bf16, for short rows) is SDPA's computation."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 10, 8, generator=g) for h in (6, 2, 2))  # grouped-query: 6 heads, 2 kv
    mask = None
    if masked:  # two sequences packed in row 0 (4 + 6 tokens), one in row 1
        seg = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
        pos = torch.tensor([list(range(4)) + list(range(6)), list(range(10))])
        mask = ((seg[:, :, None] == seg[:, None, :]) & (pos[:, None, :] <= pos[:, :, None]))[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                           enable_gqa=True)
    assert (llama.attend_math(q, k, v, mask, True) - ref).abs().max() <= 1e-5
    # in bf16 on the CPU, attend takes this path (not SDPA), within bf16 rounding of the fp32 result
    monkeypatch.setattr(llama.F, "scaled_dot_product_attention", lambda *a, **k: pytest.fail("SDPA called"))
    got = llama.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, True).float()
    assert (got - ref).abs().max() <= 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in the write step: fp32 q and k (after rope)
        got = llama.attend(q, k, v.bfloat16(), mask, True).float()
    assert (got - ref).abs().max() <= 0.05


def test_lm_loss_trains_like_plain(models, tiny):
    """Three steps with the fused optimiser track three plain-loss steps with the default AdamW."""
    ids, att = _batch(len(tiny.tokenizer), tiny.tokenizer.pad_token_id)
    a, b = copy.deepcopy(models["lora"]), copy.deepcopy(models["lora"])
    pa = [p for p in a.parameters() if p.requires_grad]
    pb = [p for p in b.parameters() if p.requires_grad]
    oa, ob = torch.optim.AdamW(pa, lr=1e-3), make_optimizer(pb, lr=1e-3)
    first = None
    for _ in range(3):
        la = a(input_ids=ids, attention_mask=att, labels=ids.masked_fill(att == 0, -100)).loss
        lb = lm_loss(b, ids, att, att.bool())
        first = first or la.item()
        assert abs(la.item() - lb.item()) <= 1e-4  # Adam's sign-like steps amplify rounding a little
        for loss, opt in ((la, oa), (lb, ob)):
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert lb.item() < first  # and it does learn


@pytest.mark.parametrize("kind", ["plain", "lora", "two-adapters"])
def test_greedy_decode_matches_generate(models, tiny, kind, monkeypatch):
    m = models[kind]
    mx = [5, 0, 3, 7, 1, 6, 4, 2]
    ref = greedy_decode(m, tiny.tokenizer, PROMPTS, mx, batch_size=3, fast=False)  # model.generate, left-padded
    for merge in (False, True):  # LoRA applied as is / folded into a per-call weight copy
        monkeypatch.setattr(D, "MERGE_MIN_TOKENS", 0 if merge else 10 ** 9)
        got = greedy_decode(m, tiny.tokenizer, PROMPTS, mx, batch_size=3)
        assert got == ref
    assert [len(x) for x in got] == mx  # random model: no EOS
    assert len({tuple(x) for x in got if x}) > 3  # the outputs differ between prompts


@pytest.mark.parametrize("graphs", [False, True])
def test_greedy_stops_at_eos(models, tiny, graphs, monkeypatch):
    """With EOS set to a token the model emits, rows stop there, as model.generate's do (graph steps:
    EOS inside a replay of 4 steps)."""
    m, tok = models["lora"], tiny.tokenizer
    free = greedy_decode(m, tok, PROMPTS, [6] * len(PROMPTS), fast=False)
    eos = free[0][2]
    seqs = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    monkeypatch.setattr(D, "CUDA_GRAPHS", graphs)
    monkeypatch.setattr(D, "GRAPH_TOKENS", 4)
    D.clear_graphs()
    try:
        with torch.inference_mode():
            got = D._greedy(llama.plan(m), seqs, [6] * len(PROMPTS), eos)
    finally:
        D.clear_graphs()
    want = [x[: x.index(eos)] if eos in x else x for x in free]
    assert got == want and len(got[0]) < 6


@pytest.mark.parametrize("kind", ["plain", "lora", "two-adapters"])
def test_answer_logprobs_match_full_logits(models, tiny, kind, monkeypatch):
    m, tok = models[kind], tiny.tokenizer
    ref = answer_logprobs(m, tok, PROMPTS, ANSWERS, batch_size=3, fast=False)  # padded batch, full logits
    ref_ids = greedy_decode(m, tok, PROMPTS, [4] * len(PROMPTS), batch_size=5, fast=False)
    for merge in (False, True):
        monkeypatch.setattr(D, "MERGE_MIN_TOKENS", 0 if merge else 10 ** 9)
        got = answer_logprobs(m, tok, PROMPTS, ANSWERS, batch_size=3)
        assert max(abs(a - b) for a, b in zip(got, ref)) <= LP_TOL
        ids, lps = decode_and_logprobs(m, tok, PROMPTS, ANSWERS, [4] * len(PROMPTS), batch_size=5)
        assert max(abs(a - b) for a, b in zip(lps, ref)) <= LP_TOL
        assert ids == ref_ids


def test_answer_split_where_tokenisation_diverges(tiny):
    """'The answer is ' ends in a space token that the answer absorbs: the prompt part is shorter
    than the prompt's own tokens, and the shared-prefill path must still score it right."""
    tok = tiny.tokenizer
    pre, ans = D.answer_token_ids(tok, "The answer is ", "Paris")
    assert len(pre) < len(tok("The answer is ", add_special_tokens=False).input_ids) and ans


def test_unsupported_adapters_fall_back(models, tiny):
    dora = _lora(models["plain"], use_dora=True)
    assert llama.plan(dora) is None
    ids, att = _batch(len(tiny.tokenizer), tiny.tokenizer.pad_token_id)
    ref = dora(input_ids=ids, attention_mask=att, labels=ids.masked_fill(att == 0, -100)).loss
    assert abs(lm_loss(dora, ids, att, att.bool()).item() - ref.item()) <= LOSS_TOL
    assert greedy_decode(dora, tiny.tokenizer, PROMPTS[:3], [3, 3, 3]) == \
        greedy_decode(dora, tiny.tokenizer, PROMPTS[:3], [3, 3, 3], fast=False)


def test_disabled_adapter_is_the_base(models, tiny):
    m, tok = models["lora"], tiny.tokenizer
    with m.disable_adapter():
        got = answer_logprobs(m, tok, PROMPTS, ANSWERS)
    ref = answer_logprobs(models["plain"], tok, PROMPTS, ANSWERS, fast=False)
    assert max(abs(a - b) for a, b in zip(got, ref)) <= LP_TOL


def test_pack_keeps_sequences_apart():
    pk = llama.pack([[1, 2, 3], [4], [5, 6]], "cpu")
    assert pk.ids.shape == (2, 3)  # [1,2,3] and [5,6,4]
    flat = pk.ids.flatten().tolist()
    assert [flat[pk.starts[k]:pk.starts[k] + n] for k, n in enumerate(pk.lengths)] == [[1, 2, 3], [4], [5, 6]]
    m = pk.mask[1, 0]  # row 2: seq [5,6] at slots 0-1, [4] at slot 2
    assert m.tolist() == [[True, False, False], [True, True, False], [False, False, True]]


def test_shared_prefix_prefilled_once(models, tiny, monkeypatch):
    """Chat-format prompts share a system prefix: computed once, same tokens and log-probs."""
    m, tok = models["lora"], tiny.tokenizer
    sys_p = "You are a helpful assistant. Answer with a short fact.\nQuestion: "
    prompts = [sys_p + p for p in PROMPTS]
    calls = []
    real = D.llama.hidden
    monkeypatch.setattr(D.llama, "hidden", lambda *a, **k: calls.append(a[1].ids.shape) or real(*a, **k))
    ids, lps = decode_and_logprobs(m, tok, prompts, ANSWERS, [4] * len(prompts))
    assert calls[0][0] == 1 and calls[0][1] >= D.SHARED_PREFIX_MIN  # the prefix, alone
    monkeypatch.setattr(D, "SHARED_PREFIX_MIN", 10 ** 9)
    assert ids == greedy_decode(m, tok, prompts, [4] * len(prompts), fast=False)
    ref = answer_logprobs(m, tok, prompts, ANSWERS, fast=False)
    assert max(abs(a - b) for a, b in zip(lps, ref)) <= LP_TOL


def test_static_step_matches_dynamic(models, tiny):
    """The fixed-shape step that CUDA graphs capture attends like the dynamic one."""
    m, tok = models["lora"], tiny.tokenizer
    p = llama.plan(m)
    seqs = [tok(x, add_special_tokens=False).input_ids for x in PROMPTS[:4]]
    outs = []
    with torch.no_grad():
        for static in (False, True):
            cache = D.Cache(p, 4, max(map(len, seqs)) + 3)
            D.prefill(p, seqs, cache)
            n = torch.tensor([len(s) for s in seqs])
            toks = torch.tensor([[5], [6], [7], [8]])
            outs.append(D.extend(p, cache, toks, n, torch.ones_like(toks, dtype=torch.bool), True, static=static))
    assert (outs[0] - outs[1]).abs().max() <= 1e-5


def test_answer_as_greedy_draft(models, tiny, monkeypatch):
    """When greedy reproduces the answer (a model that learned the fact), decode_and_logprobs takes
    the answer tokens confirmed by the log-prob pass instead of decoding them one by one; the tokens
    must be exactly greedy's, whether the draft is accepted in full, in part or not at all."""
    m, tok = models["lora"], tiny.tokenizer
    prompts = [p + " " for p in PROMPTS[:4]] + PROMPTS[4:]
    free = greedy_decode(m, tok, prompts, [5] * len(prompts), fast=False)
    # answers: greedy's own first tokens (accepted), a wrong tail (partly), or unrelated text
    answers = [tok.decode(f[:3]) if k % 3 == 0 else tok.decode(f[:1]) + " zebra" if k % 3 == 1 else "zebra"
               for k, f in enumerate(free)]
    seen = []
    real = D._answer_lp
    monkeypatch.setattr(D, "_answer_lp", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    mx = [5, 2, 6, 1, 4, 5, 3, 5]
    ids, lps = decode_and_logprobs(m, tok, prompts, answers, mx, batch_size=5)
    assert any(len(t) > 1 for conf in seen for t in conf.values())  # some drafts were accepted
    assert ids == greedy_decode(m, tok, prompts, mx, fast=False)
    ref = answer_logprobs(m, tok, prompts, answers, fast=False)
    assert max(abs(a - b) for a, b in zip(lps, ref)) <= LP_TOL


BF16_LP_TOL = 0.05  # bf16 blocks: log-probs within rounding of 30 (here 2) bf16 layers, not fp32's 1e-4


@pytest.mark.parametrize("kind", ["plain", "lora", "two-adapters"])
def test_bf16_scoring_stays_close_to_fp32(models, tiny, kind):
    m, tok = models[kind], tiny.tokenizer
    ref_ids, ref = decode_and_logprobs(m, tok, PROMPTS, ANSWERS, [4] * len(PROMPTS), batch_size=5)
    ids, lps = decode_and_logprobs(m, tok, PROMPTS, ANSWERS, [4] * len(PROMPTS), batch_size=5, dtype=torch.bfloat16)
    diff = max(abs(a - b) for a, b in zip(lps, ref))
    assert 1e-6 < diff <= BF16_LP_TOL  # bf16 really ran, and stayed close
    assert sum(a == b for a, b in zip(ids, ref_ids)) >= len(PROMPTS) - 1  # a near-tie may flip one row
    assert all(p.dtype == torch.float32 for p in m.parameters())  # the model is untouched


def test_cast_plan_folds_the_adapters_in_and_keeps_the_head(models):
    m = models["lora"]
    c = llama.plan(m, dtype=torch.bfloat16)
    assert not c.has_lora and c.dtype == torch.bfloat16 and c.layers[0].qkv.W.dtype == torch.bfloat16
    assert c.head.W.dtype == torch.float32 and c.embed.dtype == torch.float32  # logits keep fp32
    assert c.head_lp.dtype == torch.bfloat16
    # folded in fp32, rounded once: q/k/v's fused weight is (W + s B A) of each module, then cast
    a = m.get_base_model().model.layers[0].self_attn
    ref = torch.cat([mod.base_layer.weight + mod.scaling["default"] * mod.lora_B["default"].weight
                     @ mod.lora_A["default"].weight for mod in (a.q_proj, a.k_proj, a.v_proj)])
    assert (c.layers[0].qkv.W.float() - ref).abs().max() <= ref.abs().max() * 2 ** -8  # one bf16 rounding
    assert not torch.equal(c.layers[0].qkv.W.float(), torch.cat([mod.base_layer.weight for mod in (a.q_proj, a.k_proj, a.v_proj)]).bfloat16().float())
    f = llama.plan(m, fold=True)  # fp32 fold: the same sum, no rounding
    assert not f.has_lora and f.dtype == torch.float32
    assert torch.allclose(llama.dense(f.layers[0].qkv.W), ref, atol=1e-6)


def test_fp32_fold_is_one_addmm_per_group_bit_for_bit(tiny):
    """The evaluator's folded weights: one addmm over each fused group's stacked adapters, exactly as
    before (a per-module fold rounds differently at large stacked ranks, and moved the main command's
    c2w log-probs by 2e-6), here with a large second adapter as c2w's slow memory grows."""
    from peft import LoraConfig

    m = _lora(tiny.model, ("fast", "slow"), r=4)
    m.add_adapter("big", LoraConfig(r=64, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    m.base_model.set_adapter(["fast", "slow", "big"])
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    u, f, c = llama.plan(m), llama.plan(m, fold=True), llama.plan(m, dtype=torch.bfloat16)
    for a, b, lc in zip(u.layers, f.layers, c.layers):
        for name in ("qkv", "o", "gu", "down"):
            lu = getattr(a, name).stacked()  # (a plan built with grad on stacks its adapters on use)
            assert torch.equal(llama.dense(getattr(b, name).W), torch.addmm(lu.W, lu.B, lu.A))
            assert torch.equal(getattr(lc, name).W, torch.addmm(lu.W, lu.B, lu.A).bfloat16())  # then one cast


def _plans_equal(a, b) -> bool:
    return all((x is None) == (y is None) and (x is None or x.dtype == y.dtype and torch.equal(llama.dense(x), llama.dense(y)))
               for x, y in zip(llama.plan_tensors(a), llama.plan_tensors(b)))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_kept_plan_is_a_fresh_plan_bit_for_bit_in_memory_kept_between_calls(models, tiny, dtype):
    """kept_plan writes the same fold / cast into memory it keeps: a second build reuses that memory
    with the adapters' new values (nothing cached but the memory); a nested build gets its own."""
    m = _lora(tiny.model, ("fast", "slow"), r=4)
    llama.release_kept()
    for model in (models["plain"], m):  # no adapter (a cast or concatenation only); stacked adapters
        ref = llama.plan(model, fold=True, dtype=dtype)
        with llama.kept_plan(model, fold=True, dtype=dtype) as k:
            assert _plans_equal(k, ref)
            ptr = k.layers[0].qkv.W.data_ptr()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
    ref2 = llama.plan(m, fold=True, dtype=dtype)
    held = llama.kept_bytes()
    with llama.kept_plan(m, fold=True, dtype=dtype) as k2:
        assert _plans_equal(k2, ref2) and not _plans_equal(k2, ref)
        assert k2.layers[0].qkv.W.data_ptr() == ptr and llama.kept_bytes() == held > 0
        with llama.kept_plan(m, fold=True, dtype=dtype) as k3:  # nested: fresh memory, k2 untouched
            w3 = k3.layers[0].qkv.W  # (a fresh fp32 plan keeps only its packed weights: no pointer)
            assert (w3.is_mkldnn or w3.data_ptr() != ptr) and _plans_equal(k3, ref2)
        assert _plans_equal(k2, ref2)
    assert not any(p.requires_grad for p in llama.plan_tensors(k2) if p is not None)
    llama.release_kept()
    assert llama.kept_bytes() == 0


def test_kept_plan_is_plan_in_every_case(tiny):
    """Biases, fold=False (adapters stay live), and builds of other dtypes in turn without a release."""
    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(tiny.model.config)
    cfg.attention_bias = cfg.mlp_bias = True
    torch.manual_seed(3)
    biased = LlamaForCausalLM(cfg).eval()
    for model in (biased, _lora(biased, r=4), _lora(tiny.model, ("first", "second"), r=4)):
        for fold, dtype in [(True, None), (False, None), (True, torch.bfloat16), (True, None), (False, torch.bfloat16)]:
            ref = llama.plan(model, fold=fold, dtype=dtype)
            with llama.kept_plan(model, fold=fold, dtype=dtype) as k:
                assert _plans_equal(k, ref) and k.has_lora == ref.has_lora, (fold, dtype)
                if ref.layers[0].qkv.b is not None:
                    assert k.layers[0].qkv.b.dtype == ref.layers[0].qkv.b.dtype
    llama.release_kept()


def test_bf16_scoring_with_kept_memory_scores_as_without(models, tiny, monkeypatch):
    m, tok = models["two-adapters"], tiny.tokenizer
    run = lambda: decode_and_logprobs(m, tok, PROMPTS, ANSWERS, [4] * len(PROMPTS), batch_size=5,  # noqa: E731
                                      dtype=torch.bfloat16)
    monkeypatch.setattr(D, "KEEP", False)
    ref = run()
    assert llama.kept_bytes() == 0
    monkeypatch.setattr(D, "KEEP", True)
    assert run() == ref and llama.kept_bytes() > 0
    assert run() == ref  # from the kept memory
    llama.release_kept()
    with torch.inference_mode():  # kept memory made inside inference mode, written again outside it
        assert run() == ref
    assert run() == ref
    llama.release_kept()
    decode_and_logprobs(m, tok, PROMPTS, ANSWERS, [4] * len(PROMPTS), dtype=torch.float32)  # the model's own
    assert llama.kept_bytes() == 0  # dtype: nothing kept


@pytest.mark.parametrize("kind", ["plain", "two-adapters"])
def test_fp32_inference_plans_prepack_and_score_within_rounding_of_mkl(models, tiny, monkeypatch, kind):
    """PACK: folded (or adapter-free) fp32 inference plans read oneDNN-packed weights, head included; the
    numbers move only by fp32 rounding. Where a gradient is recorded they read W, so it flows. bf16
    (cast) plans pack nothing: their scores stay bit for bit."""
    m, tok = models[kind], tiny.tokenizer
    run = lambda dtype=None: decode_and_logprobs(m, tok, PROMPTS, ANSWERS, [4] * len(PROMPTS), batch_size=5,  # noqa: E731
                                                 dtype=dtype)
    monkeypatch.setattr(D, "MERGE_MIN_TOKENS", 0)  # these few probes fold (and pack) too
    calls = []
    real_packed = llama.packed
    monkeypatch.setattr(llama, "packed", lambda W: calls.append(W.shape) or real_packed(W))
    monkeypatch.setattr(llama, "PACK", False)
    monkeypatch.setattr(llama, "DNN", False)  # MKL's products, the reference
    ref_ids, ref = run()
    ref16 = run(torch.bfloat16)
    assert llama.plan(m, fold=True).layers[0].qkv.P is None
    monkeypatch.setattr(llama, "PACK", True)
    monkeypatch.setattr(llama, "DNN", True)
    c = llama.plan(m, dtype=torch.bfloat16)
    assert all(lin.P is None for L in c.layers for lin in (L.qkv, L.o, L.gu, L.down)) and c.head.P is None
    assert run(torch.bfloat16) == ref16
    f = llama.plan(m, fold=True)
    assert all(lin.P is not None for L in f.layers for lin in (L.qkv, L.o, L.gu, L.down)) and f.head.P is not None
    calls.clear()
    ids, lps = run()
    assert len(calls) >= 4 * len(f.layers) + 1 and all(lin.P is not None for lin in (f.head, f.layers[-1].down))
    assert ids == ref_ids and max(abs(a - b) for a, b in zip(lps, ref)) <= 1e-5
    assert llama.plan(m).layers[0].qkv.P is None  # not an inference plan: nothing packed
    x = torch.randn(6, f.layers[0].o.W.shape[1])
    lin = f.layers[0].o
    with torch.no_grad():
        y = lin(x)
    assert torch.allclose(y, torch.nn.functional.linear(x, llama.dense(lin.W)), atol=1e-5)
    if kind == "two-adapters":  # a fold made for this plan alone keeps only its packed form
        assert all(lin.W is lin.P for L in f.layers for lin in (L.qkv, L.o, L.gu, L.down))
        assert torch.equal(lin(x), y)  # read with gradients on too (x needing none)
    live = copy.deepcopy(tiny.model).requires_grad_(True)  # a trainable model's own weight
    lin = llama.plan(live, fold=True).layers[0].o
    assert lin.P is not None and lin.W is live.model.layers[0].self_attn.o_proj.weight
    lin(x).sum().backward()  # recorded: reads W, and its gradient arrives
    assert lin.W.grad is not None and lin.W.grad.abs().sum() > 0
    cl = llama.clone_plan(f)  # a copy reads its own plain weights
    assert cl.layers[0].qkv.P is None and torch.equal(cl.layers[0].qkv.W, llama.dense(f.layers[0].qkv.W))


def test_kept_packed_weights_score_like_folds_and_follow_every_change_to_the_model(models, tiny, monkeypatch):
    """Inside keep_packed(), fp32 scoring reads frozen weights packed once and adds the adapters unfolded:
    the numbers of the per-call fold within fp32 rounding, no packing on later calls, and every change
    seen: adapters (read live), a base weight written in place (its version), one written through
    `.data` as PEFT's merges write (a sample of its values), a model that trains (never kept)."""
    held, tok = [copy.deepcopy(models["two-adapters"])], tiny.tokenizer
    m = held[0]
    run = lambda: decode_and_logprobs(held[0], tok, PROMPTS, ANSWERS, [4] * len(PROMPTS), batch_size=5)  # noqa: E731

    def same(a, b):
        assert a[0] == b[0] and max(abs(x - y) for x, y in zip(a[1], b[1])) <= 1e-5

    calls = []
    real_packed = llama.packed
    monkeypatch.setattr(llama, "packed", lambda W: calls.append(W.shape) or real_packed(W))
    monkeypatch.setattr(D, "MERGE_MIN_TOKENS", 0)  # the reference folds (and packs) these few probes
    q = m.get_base_model().model.layers[1].self_attn.q_proj.base_layer.weight
    with llama.keep_packed():
        same(run(), ref := _fold_run(run))
        assert llama.kept_pack_bytes() > 0
        p = llama.plan(m, fold=True, tokens=100)
        assert all(lin.A is not None and lin.W is lin.P is not None and lin.parts
                   for L in p.layers for lin in (L.qkv, L.o, L.gu, L.down)) and p.head.P is not None
        assert len(p.layers[0].qkv.parts) == 3 and p.layers[0].qkv.parts[1][2:] == (8, 16)  # k's rows: ranks 8-16
        x = torch.randn(7, p.layers[0].qkv.A.shape[1])
        with torch.no_grad():
            y = p.layers[0].qkv(x)
        lin = p.layers[0].qkv
        assert torch.allclose(y, x @ llama.dense(lin.W).t() + (x @ lin.A.t()) @ lin.B.t(), atol=1e-5)
        calls.clear()
        same(run(), ref)
        assert calls == []  # nothing packed again
        with torch.no_grad():  # adapters change (an optimizer step): read live, still nothing packed
            for n, t in m.named_parameters():
                if "lora_B" in n:
                    t.mul_(1.5)
        ref = _fold_run(run)
        calls.clear()
        same(run(), ref)
        assert calls == []
        flat = q.view(-1)  # one base value no sample reads, written in place: its version changes
        step = flat.numel() // llama.SAMPLE + (flat.numel() // llama.SAMPLE % q.shape[1] == 0)
        with torch.no_grad():
            flat[1 if step > 1 else None] = -7.0
        assert step > 1 and not (llama._sample(q).view(torch.float32) == -7.0).any()
        ref = _fold_run(run)
        calls.clear()
        same(run(), ref)
        assert len(calls) == 1  # that group alone packed again
        with torch.no_grad():
            delta = torch.randn_like(q) * 0.5
        q.data += delta  # no version bump: the sample sees it
        ref = _fold_run(run)
        calls.clear()
        same(run(), ref)
        assert len(calls) == 1
        fold = llama.plan(m, fold=True, tokens=10 ** 9)  # long enough: folding pays
        assert fold.layers[0].qkv.A is None and fold.layers[0].qkv.W is fold.layers[0].qkv.P
        live = copy.deepcopy(tiny.model).requires_grad_(True)  # weights that train are never kept, and its
        assert not llama.packs_kept(live) and llama.packs_kept(held[0])  # calls keep their per-call plans
        before = llama.kept_pack_bytes()
        llama.plan(live, fold=True, tokens=10)
        assert llama.kept_pack_bytes() == before
        del m, p, lin, fold, q, flat
        held.clear()
        import gc
        gc.collect()
        assert llama.kept_pack_bytes() == 0  # a freed model's entries go with it
    assert llama._PACKS is None and llama.kept_pack_bytes() == 0


def test_kept_packed_plans_of_mixed_adapters_give_the_ordinary_plans_numbers(tiny, monkeypatch):
    """Adapters of two ranks on different modules (a fused group with an adapter-free module, the head
    with one), and the same model under disable_adapter(): a kept packed plan's logits are the ordinary
    plan's, also on 3-D inputs, and switching the adapters off packs nothing new."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(tiny.model), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules=["q_proj", "v_proj", "lm_head"]), adapter_name="one")
    pm.add_adapter("two", LoraConfig(r=2, lora_alpha=2, lora_dropout=0.0, target_modules=["k_proj", "v_proj", "up_proj"]))
    pm.base_model.set_adapter(["one", "two"])
    torch.manual_seed(0)
    with torch.no_grad():
        for n, t in pm.named_parameters():
            if "lora_B" in n:
                t.normal_(0, 0.1)
    ids = torch.randint(0, tiny.model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0)).tolist()
    logits = lambda p: p.head(llama.hidden(p, llama.pack(ids, "cpu")))  # noqa: E731
    calls = []
    real_packed = llama.packed
    monkeypatch.setattr(llama, "packed", lambda W: calls.append(W.shape) or real_packed(W))
    with torch.no_grad(), llama.keep_packed():
        for off in (False, True):
            with pm.disable_adapter() if off else contextlib.nullcontext():
                ref = logits(llama.plan(pm))
                calls.clear()
                p = llama.plan(pm, fold=True, tokens=10)
                assert calls == [] if off else len(calls) == 4 * len(p.layers) + 1
                assert p.layers[0].qkv.P is not None and (p.layers[0].qkv.A is None) == off
                assert torch.allclose(logits(p), ref, atol=1e-4)
        gu = llama.plan(pm, fold=True, tokens=10).layers[0].gu  # (adapters on again)
        assert gu.parts == ((gu.P.shape[0] // 2, gu.P.shape[0], 0, 2),)  # up only: gate has no adapter
        x = torch.randn(2, 5, gu.A.shape[1])
        assert torch.allclose(gu(x), gu(x.view(10, -1)).view(2, 5, -1), atol=1e-6)
        with torch.inference_mode():
            made_there = torch.randn(8, 8)
        assert llama._kept_pack([made_there]) is None  # no version counter: never kept
    w = pm.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    n_refs = weakref.getweakrefcount(w)
    for _ in range(5):  # scopes opened and closed leave nothing behind on the weights
        with torch.no_grad(), llama.keep_packed():
            llama.plan(pm, fold=True, tokens=10)
    assert weakref.getweakrefcount(w) == n_refs


def _fold_run(run):
    """run() outside keep_packed() (the per-call fold), even from inside a block."""
    kept, llama._PACKS = llama._PACKS, None
    try:
        return run()
    finally:
        llama._PACKS = kept


def test_kept_packed_plans_read_with_gradients_reach_the_adapters(models, tiny):
    """A plan over kept packed weights read with gradients on reads the dense weights: the adapters'
    gradients are those of the ordinary plan."""
    m = _lora(tiny.model).requires_grad_(False)
    for n, t in m.named_parameters():
        t.requires_grad_("lora_" in n)
    ids = torch.randint(0, tiny.model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))

    def grads(p):
        m.zero_grad(set_to_none=True)
        p.head(llama.hidden(p, llama.pack(ids.tolist(), "cpu"))).logsumexp(-1).sum().backward()
        return [t.grad.clone() for n, t in m.named_parameters() if "lora_" in n]

    ref = grads(llama.plan(m))
    with llama.keep_packed():
        p = llama.plan(m, fold=True, tokens=10)
        assert p.layers[0].qkv.P is not None and p.layers[0].qkv.A is not None
        got = grads(p)
    _grad_close(got, ref)


def test_a_packed_plan_read_with_gradients_or_under_autocast_reads_dense_weights(models, tiny):
    """Where a gradient is recorded (or the input has another dtype), a packed plan's products read the
    dense weights: gradients reach the input and any trainable weight as without packing."""
    ids = torch.randint(0, tiny.model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    trainable = copy.deepcopy(tiny.model).requires_grad_(True)
    lora = _lora(tiny.model).requires_grad_(True)  # its fold copies keep only their packed form
    for m, fold_ref in ((trainable, False), (lora, True)):
        def grads(fold, pack):
            llama.PACK = pack
            try:
                m.zero_grad(set_to_none=True)
                p = llama.plan(m, fold=fold)
                p.head(llama.hidden(p, llama.pack(ids.tolist(), "cpu"))).logsumexp(-1).sum().backward()
            finally:
                llama.PACK = True
            core = m.get_base_model().model if hasattr(m, "get_base_model") else m.model
            return p, [t.grad for t in (core.embed_tokens.weight, core.layers[0].self_attn.q_proj.weight)]
        ref = grads(fold_ref, False)[1]
        p, got = grads(True, True)
        assert p.layers[0].qkv.P is not None
        for a, b in zip(ref, got):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert p.layers[0].qkv.W is p.layers[0].qkv.P  # (the LoRA fold: packed only, read dense above)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 inputs to fp32 packed weights
        h = llama.hidden(p, llama.pack(ids.tolist(), "cpu"))
    assert torch.isfinite(h).all()


def test_next_token_of_a_cast_plan_is_the_exact_heads_argmax(models):
    """Candidates from the bf16 head copy, ranked by the fp32 head: the fp32 head's own argmax."""
    c = llama.plan(models["plain"], dtype=torch.bfloat16)
    h = torch.randn(64, c.head.W.shape[1]) * 3
    assert torch.equal(llama.next_token(c, h), (h @ c.head.W.t()).argmax(-1))
    assert torch.equal(llama.next_token(c, h.view(8, 8, -1)), (h @ c.head.W.t()).argmax(-1).view(8, 8))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_reused_graph_steps_decode_like_generate_across_calls(models, tiny, monkeypatch, k):
    """`--cuda-graphs`' greedy steps are kept across calls: each call loads its own weights (changed
    adapters, another model) and prefilled cache into the kept step. Off CUDA the same static steps
    run eagerly, so this checks all of it but the capture; the model's own weights stay untouched.
    k steps per replay: rows finish inside a replay (mx below, above and at k)."""
    tok = tiny.tokenizer
    m = copy.deepcopy(models["lora"])
    other = _lora(models["plain"], seed=3)
    mx = [5, 3, 7, 1, 6, 4, 2, 3]
    monkeypatch.setattr(D, "CUDA_GRAPHS", True)
    monkeypatch.setattr(D, "GRAPH_TOKENS", k)
    D.clear_graphs()
    stats0 = dict(D.GRAPH_STATS)
    try:
        for model, change in ((m, False), (m, True), (other, False), (m, False)):
            if change:  # a write between calls: the kept step must see the new adapter
                with torch.no_grad():
                    for n, p in m.named_parameters():
                        if "lora_B" in n:
                            p.add_(torch.randn_like(p) * 0.05)
            snap = {id(x): [p.detach().clone() for p in x.parameters()] for x in (m, other)}
            ref = greedy_decode(model, tok, PROMPTS, mx, batch_size=4, fast=False)  # model.generate
            for merge in (False, True):  # adapters as they are / folded into the plan's weights
                monkeypatch.setattr(D, "MERGE_MIN_TOKENS", 0 if merge else 10 ** 9)
                assert greedy_decode(model, tok, PROMPTS, mx, batch_size=4) == ref
            for x in (m, other):  # neither the called model nor the other one was written into
                assert all(torch.equal(a, b) for a, b in zip(snap[id(x)], x.parameters()))
        # two batches of 4, two plan structures (adapters as they are / folded): few captures, many reuses
        assert D.GRAPH_STATS["captures"] - stats0["captures"] <= 4
        assert D.GRAPH_STATS["reuses"] - stats0["reuses"] >= 12
        assert 0 < len(D._STEPS) <= D.GRAPH_KEEP
        # one private copy of the weights per plan structure (as is / folded), shared by its steps
        assert len(D._PLANS) == len({id(st.p) for st in D._STEPS.values()}) <= 2
    finally:
        D.clear_graphs()
    assert not D._STEPS and not D._PLANS


def test_copy_plan_refuses_another_structure(models):
    a = llama.plan(models["lora"])
    b = llama.plan(_lora(models["plain"], r=8))
    with pytest.raises(ValueError, match="structure"):
        llama.copy_plan_(a, b)
    c = llama.clone_plan(a)
    assert all(x is None or (x.data_ptr() != y.data_ptr() and torch.equal(x, y))
               for x, y in zip(llama.plan_tensors(c), llama.plan_tensors(a)))
    # the tiny model ties its head to the embedding: the copy is tied too, and an untied plan of the
    # same shapes is another structure (copying both into the one tied tensor would keep only one)
    assert a.embed is a.head.W and c.embed is c.head.W
    untied = dataclasses.replace(a, head=llama.Lin(a.head.W.clone() + 1, None, None, None))
    with pytest.raises(ValueError, match="tied"):
        llama.copy_plan_(c, untied)


@pytest.mark.parametrize("graphs, k", [(False, 1), (True, 1), (True, 4)])
def test_a_row_done_early_stays_inside_the_cache(models, graphs, k, monkeypatch):
    """A row whose whole continuation is known up front (a fully confirmed draft) is done at once
    but stays in the batch while under a quarter of the rows are done; its position kept growing
    past the cache's last slot (an IndexError; a device assert on CUDA). A cache of exactly 64
    slots also fills the graph step's bucket; with k steps a replay, every row runs past it."""
    monkeypatch.setattr(D, "GRAPH_TOKENS", k)
    p = llama.plan(models["plain"])
    g = torch.Generator().manual_seed(0)
    B, S, M = 5, 58, 6
    seqs = [torch.randint(5, 1000, (S,), generator=g).tolist() for _ in range(B)]
    monkeypatch.setattr(D, "CUDA_GRAPHS", False)
    with torch.inference_mode():
        ref = D._greedy(p, seqs, [M] * B, None)
    monkeypatch.setattr(D, "CUDA_GRAPHS", graphs)
    D.clear_graphs()
    try:
        with torch.inference_mode():
            cache = D.Cache(p, B, S + M)
            D.prefill(p, [seqs[0] + ref[0][:M - 1]] + seqs[1:], cache)
            first = [ref[0][:M]] + [[r[0]] for r in ref[1:]]
            assert D._greedy(p, seqs, [M] * B, None, cache, None, first) == ref
    finally:
        D.clear_graphs()


@pytest.mark.parametrize("fold", [False, True])
def test_scoring_skips_pad_slots(models, tiny, fold, monkeypatch):
    """Prefill and teacher forcing run their matmuls on the real tokens only, not on the pad slots of
    the packed (prefill) or padded (extend) rows, and one head pass serves log-probs and drafts: the
    same tokens, states and log-probs as the padded computation (up to fp32 rounding; bit for bit on
    the dev machine, which this does not assume), with and without a shared prefix."""
    m, tok = models["two-adapters"], tiny.tokenizer
    p = llama.plan(m, fold=fold)
    seqs = [tok(x, add_special_tokens=False).input_ids for x in PROMPTS]
    close = dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        pk = llama.pack(seqs, "cpu")
        slots = torch.tensor([pk.starts[k] + j for k, n in enumerate(pk.lengths) for j in range(n)])
        assert len(slots) < pk.ids.numel()  # there are pad slots to skip
        torch.testing.assert_close(llama.hidden(p, pk, real=slots), llama.hidden(p, pk)[slots], **close)
        pre = [None] * len(p.layers)
        llama.hidden(p, llama.pack([seqs[1][:4]], "cpu"), lambda i, k, v: pre.__setitem__(i, (k, v)))
        torch.testing.assert_close(llama.hidden(p, pk, pre=pre, real=slots), llama.hidden(p, pk, pre=pre)[slots], **close)
        # extend, teacher-forced: all rows padded together, skipping pads or not, and each row alone
        cache = D.Cache(p, 3, 40)
        D.prefill(p, seqs[:3], cache)
        start = torch.tensor([len(s) for s in seqs[:3]])
        toks = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0], [9, 10, 11, 12]])
        valid = toks > 0
        monkeypatch.setattr(D, "EXACT_ROWS", 10 ** 9)
        padded = D.extend(p, cache, toks, start, valid, False)
        monkeypatch.setattr(D, "EXACT_ROWS", 0)
        h = D.extend(p, cache, toks, start, valid, False)
        assert (h[~valid] == 0).all()
        torch.testing.assert_close(h[valid], padded[valid], **close)
        for r in range(3):
            n = int(valid[r].sum())
            sub = D.Cache.__new__(D.Cache)
            sub.k, sub.v = [t[r:r + 1] for t in cache.k], [t[r:r + 1] for t in cache.v]
            one = D.extend(p, sub, toks[r:r + 1, :n], start[r:r + 1], valid[r:r + 1, :n], False)
            torch.testing.assert_close(one[0], h[r, :n], **close)
    # end to end, drafts accepted in part (answers from greedy's own tokens): skipping (EXACT_ROWS 0)
    # and not (EXACT_ROWS huge) give the same tokens and log-probs
    free = greedy_decode(m, tok, PROMPTS, [3] * len(PROMPTS))
    answers = [tok.decode(f[:2]) if k % 2 else a for k, (f, a) in enumerate(zip(free, ANSWERS))]
    got = {}
    for rows in (0, 10 ** 9):
        monkeypatch.setattr(D, "EXACT_ROWS", rows)
        got[rows] = decode_and_logprobs(m, tok, PROMPTS, answers, [5] * len(PROMPTS), batch_size=8)
    assert got[0][0] == got[10 ** 9][0]
    assert max(abs(a - b) for a, b in zip(got[0][1], got[10 ** 9][1])) <= 1e-5


def _adapter_lin(g, x_grad=True, frozen_first=False):
    """A q/k/v-like Lin: rows 0:6, 6:8, 8:10 of a frozen W [10, 5]; module 0 with two adapters (ranks 2
    and 3), module 2 with one (rank 2), module 1 none; frozen_first: module 0's first adapter takes no
    gradient (a frozen slow adapter beside the trained one), and module 2's A none (its B one)."""
    W = torch.randn(10, 5, generator=g)
    ad = [(0, 6, 2, 2.0), (0, 6, 3, 0.5), (8, 10, 2, 4.0)]
    loras = tuple((r0, r1, torch.randn(r, 5, generator=g).requires_grad_(not (frozen_first and i != 1)),
                   torch.randn(r1 - r0, r, generator=g).requires_grad_(not (frozen_first and i == 0)), s)
                  for i, (r0, r1, r, s) in enumerate(ad))
    x = torch.randn(12, 5, generator=g).requires_grad_(x_grad)  # [N, in]: plans' rows are flat
    return W, loras, x


def _stacked_of(W, loras):
    """The same group through `_stacked` (A stacked, B block-structured), as a plan builds it."""
    mods = [(W[0:6], None, [(A, B, s) for r0, _, A, B, s in loras if r0 == 0]), (W[6:8], None, []),
            (W[8:10], None, [(A, B, s) for r0, _, A, B, s in loras if r0 == 8])]
    return llama._stacked(mods, torch.float32, W)


@pytest.mark.parametrize("x_grad,frozen_first", [(True, False), (False, False), (True, True)])
def test_fused_lora_is_the_stacked_product_and_its_gradients(x_grad, frozen_first, monkeypatch):
    """fp32 CPU training runs a group's adapters through `_LoraLinear` (each adapter on its own module's
    rows): the stacked form's output and gradients (x, every A and B) within fp32 rounding, none for what
    takes none; the stacked form itself where a gradient cannot be handed out by hand or is not wanted."""
    W, loras, x = _adapter_lin(torch.Generator().manual_seed(0), x_grad, frozen_first)
    lin = _stacked_of(W, loras)
    assert lin.loras is not None and [lo[:2] for lo in lin.loras] == [(0, 6), (0, 6), (8, 10)]
    ran, handed = [], []
    fwd, bwd = llama._LoraLinear.forward, llama._LoraLinear.backward
    monkeypatch.setattr(llama._LoraLinear, "forward", staticmethod(lambda *a: ran.append(1) or fwd(*a)))
    monkeypatch.setattr(llama._LoraLinear, "backward", staticmethod(lambda *a: handed.append(bwd(*a)) or handed[-1]))
    gy = torch.randn(12, 10, generator=torch.Generator().manual_seed(1))
    params = ([x] if x_grad else []) + [t for *_, A, B, _ in loras for t in (A, B) if t.requires_grad]
    got = lin(x)
    assert ran == [1]
    g_got = torch.autograd.grad(got, params, gy)
    wanted = [x.requires_grad, False, False, False] + [t.requires_grad for *_, A, B, _ in loras for t in (A, B)]
    assert [t is not None for t in handed[0]] == wanted  # a gradient exactly for what takes one
    monkeypatch.setattr(llama, "FUSED_LORA", False)
    ref = lin(x)
    g_ref = torch.autograd.grad(ref, params, gy)
    assert ran == [1] and (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert all((a - b).abs().max() <= 1e-5 * b.abs().max() for a, b in zip(g_got, g_ref))
    assert all(a.shape == b.shape for a, b in zip(g_got, params))
    monkeypatch.setattr(llama, "FUSED_LORA", True)
    with torch.no_grad():  # nothing to differentiate: the stacked form
        assert (lin(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's casts: the stacked form
        lin(x)
    W.requires_grad_()  # a trained base weight (no dW by hand): the stacked form
    _stacked_of(W, loras)(x).sum().backward()
    assert ran == [1] and W.grad is not None


def test_fp32_lora_write_step_runs_fused_and_matches_the_stacked_form(models, tiny, monkeypatch):
    """Through a PEFT model with two active adapters, fp32 on the CPU: every group of every layer runs
    `_LoraLinear`, with the stacked form's loss and gradients."""
    ids, att = _batch(len(tiny.tokenizer), tiny.tokenizer.pad_token_id)
    m = copy.deepcopy(models["two-adapters"])
    params = [p for p in m.parameters() if p.requires_grad]
    ran = []
    fwd = llama._LoraLinear.forward
    monkeypatch.setattr(llama._LoraLinear, "forward", staticmethod(lambda *a: ran.append(1) or fwd(*a)))

    def run():
        loss = lm_loss(m, ids, att, att.bool())
        return loss.item(), torch.autograd.grad(loss, params)

    got, g = run()
    assert len(ran) == 4 * len(m.get_base_model().model.layers)
    monkeypatch.setattr(llama, "FUSED_LORA", False)
    ref, gref = run()
    assert len(ran) == 4 * len(m.get_base_model().model.layers) and abs(got - ref) <= LOSS_TOL
    assert all((a - b).abs().max() <= GRAD_RTOL * b.abs().max() for a, b in zip(g, gref))


def test_hand_written_backward_of_rms_and_rope(monkeypatch):
    """RMS norm and rotary embedding with their backward by hand (CPU training): the forward bit for bit
    the ops they replace, the gradients (x, and the norm's weight) autograd's within fp32 rounding; the
    plain ops where nothing needs a gradient or autocast is on."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 8, generator=g).requires_grad_()
    w = torch.randn(8, generator=g).requires_grad_()
    cos, sin = torch.randn(1, 1, 7, 8, generator=g), torch.randn(1, 1, 7, 8, generator=g)
    gy = torch.randn(2, 3, 7, 8, generator=g)
    ran = []
    for name in ("_RMSNorm", "_Rope"):
        f = getattr(llama, name).forward
        monkeypatch.setattr(getattr(llama, name), "forward", staticmethod(lambda *a, f=f, n=name: ran.append(n) or f(*a)))
    got = [llama.rms(x, w, 1e-6), llama.rope(x, cos, sin)]
    assert ran == ["_RMSNorm", "_Rope"]
    g_got = [torch.autograd.grad(y, (x, w), gy, allow_unused=True) for y in got]
    monkeypatch.setattr(llama, "HAND_BACKWARD", False)
    ref = [llama.rms(x, w, 1e-6), llama.rope(x, cos, sin)]
    g_ref = [torch.autograd.grad(y, (x, w), gy, allow_unused=True) for y in ref]
    h = x.shape[-1] // 2  # the rotation spelled out: the forward is the same ops, bit for bit
    assert torch.equal(ref[1], x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin)
    assert len(ran) == 2 and all(torch.equal(a, b) for a, b in zip(got, ref))
    for ga, gb in zip(g_got, g_ref):
        for a, b in zip(ga, gb):
            assert (a is None) == (b is None) and (a is None or (a - b).abs().max() <= 1e-5 * b.abs().max())
    monkeypatch.setattr(llama, "HAND_BACKWARD", True)
    with torch.no_grad():
        llama.rms(x, w, 1e-6), llama.rope(x, cos, sin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        llama.rms(x, w, 1e-6), llama.rope(x, cos, sin)
    llama.rms(x.detach(), w.detach(), 1e-6), llama.rope(x.detach(), cos, sin)
    assert len(ran) == 2


def test_training_plans_stack_adapters_only_on_use(tiny):
    """An fp32 CPU plan built with gradients on leaves each group's stacked A / B unbuilt (`_LoraLinear`
    reads the adapters unstacked); `stacked()` builds them exactly as an inference plan does: A the
    adapters' A stacked along the rank, B each module's rows holding its adapters' scaled B in their
    rank columns, zero elsewhere. A path that needs them (here autocast) builds them on use."""
    m = _lora(tiny.model, ("fast", "slow"), r=4)
    for n, p in m.named_parameters():
        p.requires_grad_(".fast." in n)
    lazy = llama.plan(m)
    with torch.no_grad():
        eager = llama.plan(m)
    assert lazy.has_lora and all(getattr(L, g).A is None and getattr(L, g).adapted
                                 for L in lazy.layers for g in ("qkv", "o", "gu", "down"))
    blk = m.get_base_model().model.layers[0]
    mods = [blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj]
    As = [mod.lora_A[n].weight for mod in mods for n in mod.active_adapters]
    B_ref = torch.zeros(sum(mod.base_layer.weight.shape[0] for mod in mods), sum(a.shape[0] for a in As))
    r0 = c = 0
    for mod in mods:
        for n in mod.active_adapters:
            Bn = mod.lora_B[n].weight * mod.scaling[n]
            B_ref[r0:r0 + Bn.shape[0], c:c + Bn.shape[1]] = Bn
            c += Bn.shape[1]
        r0 += mod.base_layer.weight.shape[0]
    q = lazy.layers[0].qkv.stacked()
    assert torch.equal(q.A, torch.cat(As)) and torch.equal(q.B, B_ref) and q.B.requires_grad
    for La, Le in zip(lazy.layers, eager.layers):
        for g in ("qkv", "o", "gu", "down"):
            a, e = getattr(La, g).stacked(), getattr(Le, g)
            assert torch.equal(a.A, e.A) and torch.equal(a.B, e.B) and a.parts == e.parts
    lazy = llama.plan(m)
    with torch.no_grad():  # stacked with gradients off: a copy, so that a later use with gradients reaches them
        assert not lazy.layers[0].o.stacked().B.requires_grad and lazy.layers[0].o.A is None
    with llama.step_cache(), torch.autocast("cpu", dtype=torch.bfloat16):  # the stacked form, with its gradients
        lazy.layers[0].o(torch.randn(5, lazy.layers[0].o.W.shape[1])).float().sum().backward()
    assert lazy.layers[0].o.B.requires_grad and blk.self_attn.o_proj.lora_B["fast"].weight.grad.abs().sum() > 0
    x = torch.randn(5, lazy.layers[0].qkv.W.shape[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref = lazy.layers[0].qkv(x), eager.layers[0].qkv(x)
    assert lazy.layers[0].qkv.A is not None and torch.equal(got, ref)


def test_write_loops_fold_frozen_adapters_once(tiny, monkeypatch):
    """Inside step_cache(), fp32 CPU training folds adapters that take no gradient (a slow adapter
    beside the trained fast one) into the loop's copy of each group's weights once: the loss and the
    fast adapter's gradients of the unfolded form within fp32 rounding; the fold is reused while the
    weights stay, redone when a frozen adapter is written; outside step_cache nothing is folded."""
    m = _lora(tiny.model, ("fast", "slow"), r=4)
    for n, p in m.named_parameters():
        p.requires_grad_(".fast." in n)
    params = [p for p in m.parameters() if p.requires_grad]
    ids, att = _batch(len(tiny.tokenizer), tiny.tokenizer.pad_token_id)
    folds = []
    fw = llama._folded_weight

    def spy(*a):  # records whether this call folded anew
        old = llama._LOWP.get(("folded", id(a[0][0])))
        out = fw(*a)
        folds.append(old is None or out is not old[2])
        return out

    monkeypatch.setattr(llama, "_folded_weight", spy)

    def run():
        loss = lm_loss(m, ids, att, att.bool())
        return loss.item(), torch.autograd.grad(loss, params)

    ref, gref = run()  # outside step_cache: unfolded
    assert folds == []
    n_groups = 4 * len(m.get_base_model().model.layers)
    with llama.step_cache():
        p = llama.plan(m)
        assert all(len(getattr(L, g).loras) == n and all(A.requires_grad for _, _, A, _, _ in getattr(L, g).loras)
                   for L in p.layers for g, n in (("qkv", 3), ("o", 1), ("gu", 2), ("down", 1)))  # the fast adapter's
        got, g = run()
        assert abs(got - ref) <= LOSS_TOL and all((a - b).abs().max() <= GRAD_RTOL * b.abs().max() for a, b in zip(g, gref))
        assert len(folds) == 2 * n_groups and sum(folds) == n_groups  # built at the first plan, reused after
        slow = [q for n, q in m.named_parameters() if ".slow." in n and "lora_B" in n][0]
        with torch.no_grad():
            slow.mul_(2.0)  # a written frozen adapter: its group folds again
        folds.clear()
        got2, _ = run()
        assert sum(folds) == 1 and got2 != got
        mod = m.get_base_model().model.layers[0].mlp.down_proj
        mod.scaling["slow"] *= 3.0  # a changed scale (PEFT's set_scale): that group folds again
        folds.clear()
        got3, _ = run()
        mod.scaling["slow"] /= 3.0
        assert sum(folds) == 1 and got3 != got2
    monkeypatch.setattr(llama, "FOLD_FROZEN", False)
    assert abs(run()[0] - got2) <= LOSS_TOL


def test_hand_written_backward_passes_refuse_second_derivatives():
    """The hand-written backward passes record no graph of their own: asking for second derivatives
    through them raises, where a silent wrong answer would be worse (first derivatives still flow)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g).requires_grad_()
    w = torch.randn(8, generator=g)
    W, loras, xl = _adapter_lin(g)
    for y, inp in ((llama.rms(x, w, 1e-6), x), (llama.Lin(W, None, None, None, loras=loras, rows=10)(xl), xl)):
        gx, = torch.autograd.grad(y.square().sum(), inp, create_graph=True)
        assert gx.abs().sum() > 0
        with pytest.raises(RuntimeError):
            gx.sum().backward()
