"""Greedy decoding and teacher-forced answer log-probabilities for probe scoring.

On Llama-layout models (plain or PEFT LoRA) both run on the lean path of `c2w.fast.llama`:
prompts are packed without padding into one prefill that fills a KV cache and computes logits only
at each prompt's last token; greedy steps then run a short hand-written loop over the cache (rows
that reach EOS or their own token limit leave the batch). Answer log-probs take logits only at the
answer positions. `decode_and_logprobs` does both from one shared prefill. LoRA adapters are folded
into a per-call copy of the weights when the call processes enough tokens to pay for it (always when
it casts them to bf16); the live model is never modified. Other models use `model.generate` / a full forward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from c2w.fast import llama

DRAFT = True  # decode_and_logprobs: the answer serves as greedy's draft (exact: verified by the same pass)
# Scoring skips pad slots (prefill, teacher forcing) and takes one head pass for log-probs and drafts only
# where every matmul involved has at least this many rows. On the dev machine's CPU, fp32 matmul rows
# come out bit for bit the same whatever the other rows from 12 rows up (MKL, F.linear: below, 1-3 rows
# on 1 thread, and any count not a multiple of 4 under 12 on 2, differ in the last bits; the packed oneDNN
# products of fp32 inference plans, llama.PACK, differed only at 1 row, and session 28's dense oneDNN
# products, llama.DNN, at none from 2 rows up): so the evaluator's numbers stay exactly
# as they are with and without the saving there (elsewhere: within fp32 rounding)
EXACT_ROWS = 16


def _skip_pads(n_real: int, n_slots: int) -> bool:
    """Whether a pass runs its matmuls on the n_real real tokens only, not on all n_slots slots."""
    return n_real < n_slots and n_real >= EXACT_ROWS
MERGE_MIN_TOKENS = 256  # fold LoRA into the weights for calls that process at least this many tokens


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield range(i, min(n, i + size))


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


# cast plans (a dtype other than the model's: bf16 scoring) write their weights into memory kept between
# calls (llama.kept_plan: about 270 MB for SmolLM2-135M). On the dev machine that took 13-17% (0.2-0.36 s)
# off a bf16 scoring call of 32 probes, the page faults of fresh copies (BENCHMARKS.md, session 25). A
# fold in the model's own dtype (about 400 MB in fp32) gained 9% and stays fresh: the evaluator's
# default path keeps no memory between calls
KEEP = True


def _casts(model, dtype: torch.dtype | None) -> bool:
    """Whether `dtype` is other than the model's own (its input embedding's)."""
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    return dtype is not None and (emb is None or emb.weight.dtype != dtype)


@contextlib.contextmanager
def _plan_for(model, n_tokens: int, fast: bool, dtype: torch.dtype | None = None):
    # folding costs one pass over the weights (a copy): worth it over enough tokens; a dtype folds as it casts
    fold = n_tokens >= MERGE_MIN_TOKENS
    if not fast:
        yield None
    elif KEEP and _casts(model, dtype):
        with llama.kept_plan(model, fold=fold, dtype=dtype) as p:
            yield p
    elif not _casts(model, dtype) and llama.packs_kept(model):  # each group folds only where that pays
        yield llama.plan(model, fold=True, tokens=n_tokens)
    else:
        yield llama.plan(model, fold=fold, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# KV cache and the three kinds of forward over it


class Cache:
    """Per-layer keys/values [B, Hkv, Lmax, D]; row b holds its sequence at positions 0..n_b-1."""

    def __init__(self, p: llama.Plan, B: int, Lmax: int):
        shape = (B, p.n_kv, Lmax, p.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in p.layers]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in p.layers]

    def keep(self, rows: torch.Tensor) -> None:
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]


SHARED_PREFIX_MIN = 8  # prompts of a batch that share at least this many leading tokens prefill them once


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(map(len, seqs)) - 1  # every prompt keeps at least one token of its own
    first = seqs[0]
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def prefill(p: llama.Plan, seqs: list[list[int]], cache: Cache) -> torch.Tensor:
    """Run the prompts (packed, no padding) into rows 0..B-1 of the cache; hidden at each last token.
    A leading run of tokens shared by every prompt (a chat system prompt) is computed once."""
    dev = p.device
    P = _common_prefix(seqs) if len(seqs) > 1 else 0
    pre = None
    if P >= SHARED_PREFIX_MIN:
        pre = [None] * len(p.layers)

        def keep(i, k, v):
            pre[i] = (k, v)
            cache.k[i][:, :, :P] = k[0]
            cache.v[i][:, :, :P] = v[0]

        llama.hidden(p, llama.pack([seqs[0][:P]], dev), keep)
        seqs = [s[P:] for s in seqs]
    else:
        P = 0
    pk = llama.pack(seqs, dev)
    R, C = pk.ids.shape
    src = torch.cat([torch.arange(s, s + n) for s, n in zip(pk.starts, pk.lengths)]).to(dev)
    row = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(pk.lengths)]).to(dev)
    col = torch.cat([torch.arange(P, P + n) for n in pk.lengths]).to(dev)

    def put(i, k, v):
        cache.k[i][row, :, col] = k.transpose(1, 2).reshape(R * C, p.n_kv, p.head_dim)[src]
        cache.v[i][row, :, col] = v.transpose(1, 2).reshape(R * C, p.n_kv, p.head_dim)[src]

    if _skip_pads(len(src), R * C):  # the layers' matmuls skip the pad slots; h [N, d] in sequence order
        h = llama.hidden(p, pk, put, pre, src)
        last = torch.tensor(pk.lengths, device=dev).cumsum(0) - 1
    else:
        h = llama.hidden(p, pk, put, pre)
        last = torch.tensor([s + n - 1 for s, n in zip(pk.starts, pk.lengths)], device=dev)
    return h.index_select(0, last)


def extend(p: llama.Plan, cache: Cache, toks: torch.Tensor, start: torch.Tensor, valid: torch.Tensor,
           write: bool, static: bool = False, kv_new=None) -> torch.Tensor:
    """Run S new tokens per row [B, S] at positions start_b + j, attending to cache positions
    < start_b and causally to each other. write=True stores their keys/values in the cache (decode);
    write=False leaves it as it was (teacher forcing; from EXACT_ROWS valid tokens the projections skip
    the slots not valid, whose returned states are then zeros). Returns final-norm hidden [B, S, d].
    static=True (write only) attends over the whole cache length under the mask: fixed shapes, no
    host sync, so the step can be captured in a CUDA graph."""
    B, S = toks.shape
    H, Hk, D = p.n_heads, p.n_kv, p.head_dim
    dev = toks.device
    j = torch.arange(S, device=dev)
    pos = start[:, None] + j  # [B, S]
    Lc = cache.k[0].shape[2] if static else int(start.max()) + (S if write else 0)
    if write:
        key = torch.arange(Lc, device=dev)
        mask = (key[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, S, Lc]
        rows = torch.arange(B, device=dev)[:, None].expand(B, S)
    else:
        key = torch.arange(Lc, device=dev)
        old = (key[None, :] < start[:, None])[:, None, :].expand(B, S, Lc)
        new = (j[None, :] <= j[:, None])[None] & (valid[:, None, :] | (j[None, :] == j[:, None])[None])
        mask = torch.cat([old, new], -1)[:, None]  # [B, 1, S, Lc + S]
    # teacher forcing pads rows to the longest: the matmuls run on the valid tokens only (as in prefill)
    real = None if write else valid.flatten().nonzero().squeeze(1)
    if real is not None and not _skip_pads(len(real), B * S):
        real = None
    at = None if real is None else (real // S, real % S)  # each valid token's (row, slot)
    h = llama.embed(p, toks).view(B * S, -1) if real is None else llama.embed(p, toks.view(-1).index_select(0, real))
    cos, sin = llama.cos_sin(p, pos)
    for i, L in enumerate(p.layers):
        x = llama.rms(h, L.ln1, p.eps)
        qkv = L.qkv(x)
        if real is not None:  # back to [B*S, F], pad slots zero
            qkv = llama.spread(qkv, real, B * S)
        q, k, v = qkv.view(B, S, H + 2 * Hk, D).transpose(1, 2).split([H, Hk, Hk], 1)
        q, k = llama.rope(q, cos, sin), llama.rope(k, cos, sin)
        if write:
            cache.k[i][rows, :, pos] = k.transpose(1, 2)
            cache.v[i][rows, :, pos] = v.transpose(1, 2)
            kk, vv = cache.k[i][:, :, :Lc], cache.v[i][:, :, :Lc]
        else:
            if kv_new is not None:
                kv_new(i, k, v)
            kk = torch.cat([cache.k[i][:, :, :Lc], k], 2)
            vv = torch.cat([cache.v[i][:, :, :Lc], v], 2)
        o = llama.attend(q, kk, vv, mask, False).transpose(1, 2)  # [B, S, H, D]
        o = o.reshape(B * S, H * D) if at is None else o[at].view(-1, H * D)
        h = h + L.o(o)
        g, u = L.gu(llama.rms(h, L.ln2, p.eps)).chunk(2, -1)
        h = h + L.down(F.silu(g) * u)
    h = llama.rms(h, p.norm, p.eps)
    if real is not None:  # pad slots zero
        h = llama.spread(h, real, B * S)
    return h.view(B, S, -1)


def _greedy(p: llama.Plan, seqs: list[list[int]], max_new: list[int], eos: int | None,
            cache: Cache | None = None, h_last: torch.Tensor | None = None,
            first: list[list[int]] | None = None) -> list[list[int]]:
    """Greedy continuations (cut at EOS, at max_new[k]) from a prefilled cache (made here if None).
    first[r]: greedy tokens already known for row r (at least one); the cache then holds all but the
    last of them, which is the next step's input."""
    B = len(seqs)
    dev = p.device
    max_new = list(max_new)
    out: list[list[int]] = [[] for _ in seqs]
    if max(max_new) <= 0:
        return out
    if cache is None:
        cache = Cache(p, B, max(len(s) for s in seqs) + max(max_new))
        h_last = prefill(p, seqs, cache)
    if first is None:
        first = [[t] for t in llama.next_token(p, h_last).tolist()]
    graph = _graph_step(p, cache) if CUDA_GRAPHS and _graphable(p) else None
    last = (graph.cache if graph is not None else cache).k[0].shape[2] - 1  # the cache's last slot
    n = torch.tensor([len(s) + len(f) - 1 for s, f in zip(seqs, first)], device=dev)
    live = list(range(B))  # sequence index of each cache row
    new = first
    while True:
        done = []
        for r, k in enumerate(live):
            for t in new[r]:
                if max_new[k] <= 0 or (eos is not None and t == eos):
                    max_new[k] = 0
                    break
                out[k].append(t)
                if len(out[k]) >= max_new[k]:
                    max_new[k] = 0
                    break
            if max_new[k] <= 0:
                done.append(r)
        if len(done) == len(live):
            return out
        tok = torch.tensor([x[-1] for x in new], device=dev)
        if graph is None and (done and len(done) * 4 >= len(live) or len(live) <= 2 and done):
            keep = [r for r in range(len(live)) if max_new[live[r]] > 0]
            idx = torch.tensor(keep, device=dev)
            cache.keep(idx)
            tok, n = tok[idx], n[idx]
            live = [live[r] for r in keep]
        # a row that is done but still in the batch (under a quarter are done, or a graph's fixed
        # rows) keeps stepping; one done at once (a whole confirmed draft) would pass the cache's
        # end: it rewrites its own last slot instead (its tokens are ignored, no other row reads it)
        if graph is not None:  # graph.k steps, each feeding its argmax to the next on the device
            new = graph(tok, n).tolist()  # [B, k]: one read back per k tokens
            n = (n + graph.k).clamp_(max=last)
        else:
            h = extend(p, cache, tok[:, None], n, torch.ones_like(tok[:, None], dtype=torch.bool), True)
            new = [[t] for t in llama.next_token(p, h[:, 0]).tolist()]
            n = (n + 1).clamp_(max=last)


CUDA_GRAPHS = False  # replay greedy steps from captured CUDA graphs (set by `c2w perf --cuda-graphs`)
GRAPH_BUCKET = 64  # a captured step serves every call whose cache fits its length, rounded up to this
GRAPH_KEEP = 4  # captured steps kept across calls, least recently used dropped first
GRAPH_TOKENS = 8  # greedy steps per graph replay: the host reads tokens back once per this many (rows
# that finish inside a replay still take its remaining steps; their tokens are ignored)
GRAPH_ROPE = ("default", "linear", "llama3", "yarn")  # rotary kinds whose forward reads only inv_freq
_STEPS: dict = {}  # (batch, cache length, steps per replay, plan structure) -> _GraphStep
_PLANS: dict = {}  # plan structure -> the private plan its steps share (one copy of the weights)
GRAPH_STATS = {"captures": 0, "reuses": 0}


def clear_graphs() -> None:
    """Drop the captured greedy steps (and the weights and caches they hold)."""
    _STEPS.clear()
    _PLANS.clear()


def _graphable(p: llama.Plan) -> bool:
    # dynamic RoPE syncs with the host in its forward (no capture); longrope keeps tensors outside buffers
    return getattr(p.rotary, "rope_type", "default") in GRAPH_ROPE


def _structure(p: llama.Plan) -> tuple:
    r = p.rotary
    return (p.dtype, str(p.device), p.eps, p.n_heads, p.n_kv, p.head_dim, type(r).__name__,
            getattr(r, "rope_type", None), getattr(r, "attention_scaling", None),  # a float the graph keeps
            tuple(None if t is None else (tuple(t.shape), t.dtype) for t in llama.plan_tensors(p)), llama.plan_aliases(p))


@torch.inference_mode()
def _graph_step(p: llama.Plan, cache: Cache) -> _GraphStep:
    """The captured step for this batch, cache length (bucketed) and plan structure, made on first use,
    loaded with this call's weights and prefilled cache."""
    B, L = cache.k[0].shape[0], cache.k[0].shape[2]
    shape = _structure(p)
    key = (B, -(-L // GRAPH_BUCKET) * GRAPH_BUCKET, GRAPH_TOKENS, shape)
    step = _STEPS.pop(key, None)
    if step is None:
        while len(_STEPS) >= GRAPH_KEEP:
            _STEPS.pop(next(iter(_STEPS)))  # the least recently used
        for k in [k for k, q in _PLANS.items() if k != shape and all(s.p is not q for s in _STEPS.values())]:
            del _PLANS[k]  # no step left on it
        if shape not in _PLANS:
            _PLANS[shape] = llama.clone_plan(p)  # private: loading a call's weights never writes into a model
        step = _GraphStep(_PLANS[shape], B, key[1], GRAPH_TOKENS)
        GRAPH_STATS["captures"] += 1
    else:
        GRAPH_STATS["reuses"] += 1
    _STEPS[key] = step
    step.load(p, cache)
    return step


class _GraphStep:
    """k greedy steps (static shapes over the whole cache) captured once as a CUDA graph: each step's
    argmax is the next step's input on the device, so the host syncs once per k tokens, not per token
    (session 11 measured 8.2 ms a token at batch 1 with a read-back after each replay). It runs over a
    private plan (a copy of the weights, shared by the steps of one structure) and its own cache, so
    that later calls of the same shapes reuse it: `load` copies their weights (adapters may have
    changed since) and their prefilled cache in, one device copy instead of two eager warm-ups and a
    capture per call. Rows that finish stay in the batch (their tokens are ignored): the shapes never
    change. Off CUDA nothing is captured: the same static steps run eagerly (what the CPU tests
    exercise)."""

    def __init__(self, p: llama.Plan, B: int, Lmax: int, k: int = 1):
        dev = p.device
        self.p = p  # the private plan (_PLANS)
        self.k = k
        self.cache = Cache(self.p, B, Lmax)
        self.tok = torch.zeros((B, 1), dtype=torch.long, device=dev)
        self.n = torch.full((B,), Lmax - 1, dtype=torch.long, device=dev)  # warm-up writes the last slot,
        self.valid = torch.ones((B, 1), dtype=torch.bool, device=dev)      # which no step reads unwritten
        self.out = torch.zeros((B, k), dtype=torch.long, device=dev)
        self.last = Lmax - 1
        self.graph = None
        if dev.type == "cuda":
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.n.fill_(self.last)
                    self._run()
            torch.cuda.current_stream(dev).wait_stream(side)
            self.n.fill_(self.last)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._run()

    def _run(self) -> torch.Tensor:
        """k steps from tok at slots n; their tokens into out [B, k] (greedy: the head's argmax)."""
        for j in range(self.k):
            h = extend(self.p, self.cache, self.tok, self.n, self.valid, True, static=True)[:, 0]
            nxt = self.p.head(h).argmax(-1)
            self.out[:, j] = nxt
            self.tok[:, 0] = nxt
            self.n.add_(1).clamp_(max=self.last)  # a row past the cache's end rewrites its last slot
        return self.out

    def load(self, p: llama.Plan, cache: Cache) -> None:
        """This call's weights and prefilled cache [B, Hkv, L, D] (L <= the step's length) into the step.
        Slots past L keep an earlier call's values: a row attends only to slots it has written."""
        llama.copy_plan_(self.p, p)
        L = cache.k[0].shape[2]
        for dst, src in zip(self.cache.k + self.cache.v, cache.k + cache.v):
            dst[:, :, :L].copy_(src)

    def __call__(self, tok: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """The next k greedy tokens [B, k] after tok [B] at slots n [B]."""
        self.tok.copy_(tok[:, None])
        self.n.copy_(n)
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.out


def _answer_lp(p: llama.Plan, cache: Cache, rows: list[int], pre: list[list[int]], ans: list[list[int]],
               res: list[float], out_idx: list[int], draft: list[bool] | None = None) -> dict[int, list[int]]:
    """Mean log p(ans | pre) per item into res, from cache rows holding (at least) pre's tokens.

    draft[r]: pre is the whole decode prompt of cache row rows[r]; its answer is then also a draft
    for greedy decoding (speculative decoding, verified by this very pass): returns, per such cache
    row, the greedy tokens it confirms (the answer's leading tokens that greedy reproduces, then
    greedy's next token) and writes the confirmed tokens' keys/values into the cache."""
    dev = p.device
    draft = draft or [False] * len(rows)
    seqs = [[q[-1]] + (a if d else a[:-1]) for q, a, d in zip(pre, ans, draft)]
    S = max(map(len, seqs))
    toks = torch.zeros((len(rows), S), dtype=torch.long)
    tgt = torch.zeros((len(rows), S), dtype=torch.long)
    inp = torch.zeros((len(rows), S), dtype=torch.bool)
    tv = torch.zeros((len(rows), S), dtype=torch.bool)
    for r, (s, a) in enumerate(zip(seqs, ans)):
        toks[r, :len(s)] = torch.tensor(s)
        inp[r, :len(s)] = True
        tgt[r, :len(a)] = torch.tensor(a)
        tv[r, :len(a)] = True
    sub = cache
    if rows != list(range(len(cache.k[0]))):
        sub = Cache.__new__(Cache)
        idx = torch.tensor(rows, device=dev)
        sub.k = [t.index_select(0, idx) for t in cache.k]
        sub.v = [t.index_select(0, idx) for t in cache.v]
    start = torch.tensor([len(q) - 1 for q in pre], device=dev)
    kv: list = [None] * len(p.layers)
    hook = (lambda i, k, v: kv.__setitem__(i, (k, v))) if any(draft) else None
    h = extend(p, sub, toks.to(dev), start, inp.to(dev), False, kv_new=hook)
    dr = [r for r, d in enumerate(draft) if d]
    extra = torch.zeros_like(inp)  # draft rows' input slots that are no target
    extra[dr] = inp[dr] & ~tv[dr]
    tv = tv.to(dev)
    sel = tv.flatten().nonzero().squeeze(1)  # the targets' slots
    # one head pass over every position read: the targets and, on draft rows, every input token
    # (greedy's choice after it: the argmax of the same logits, what next_token takes from an uncast
    # plan; a cast plan's next_token picks among bf16 candidates, so its drafts keep using it)
    one = p.head_lp is None and len(sel) >= EXACT_ROWS and (not dr or len(dr) * S >= EXACT_ROWS)
    used = torch.cat([sel, extra.flatten().nonzero().squeeze(1).to(dev)]) if one and dr else sel
    z = p.head(h.reshape(-1, h.shape[-1]).index_select(0, used)).float()  # [n_used, V]: the targets' rows first
    lp = torch.log_softmax(z[:len(sel)], -1).gather(1, tgt.to(dev).flatten()[sel][:, None]).squeeze(1)
    for k, v in zip(out_idx, torch.split(lp, tv.sum(1).tolist())):
        res[k] = v.mean().item()
    confirmed: dict[int, list[int]] = {}
    if not dr:
        return confirmed
    if one:
        best = dict(zip(used.tolist(), z.argmax(-1).tolist()))  # flat slot -> greedy's choice after its token
        g = [[best[r * S + j] for j in range(len(seqs[r]))] for r in dr]
    else:
        g = llama.next_token(p, h[dr]).tolist()  # [n_draft, S]: greedy's choice after each input token
    for r, gr in zip(dr, g):
        a = ans[r]
        m = 0
        while m < len(a) and gr[m] == a[m]:
            m += 1
        confirmed[rows[r]] = gr[: m + 1]
        if m:  # keys/values of the accepted answer tokens (extend slots 1..m) join the cache
            L = len(pre[r])
            for i, (k, v) in enumerate(kv):
                cache.k[i][rows[r], :, L:L + m] = k[r, :, 1:m + 1]
                cache.v[i][rows[r], :, L:L + m] = v[r, :, 1:m + 1]
    return confirmed


# ---------------------------------------------------------------------------------------------
# the public entry points


@torch.no_grad()
def greedy_decode(model, tokenizer, prompts: list[str], max_new_tokens: list[int], batch_size: int = 32,
                  *, fast: bool = True) -> list[list[int]]:
    """Greedy continuation token ids for each prompt, item k cut at max_new_tokens[k] tokens.

    Stops a row at EOS. Same tokens as `model.generate` on left-padded batches (greedy).
    """
    if not prompts:
        return []
    seqs = _encode(tokenizer, prompts)
    with _plan_for(model, sum(map(len, seqs)) + sum(max_new_tokens), fast) as p:
        if p is None or any(len(s) == 0 for s in seqs):
            return _hf_greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
        out: list[list[int]] = [[] for _ in prompts]
        with torch.inference_mode():
            for idx in _batches(len(prompts), batch_size):
                res = _greedy(p, [seqs[k] for k in idx], [max_new_tokens[k] for k in idx], tokenizer.eos_token_id)
                for k, r in zip(idx, res):
                    out[k] = r
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
def answer_logprobs(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 32,
                    *, fast: bool = True) -> list[float]:
    """Mean per-token log p(answer | prompt) under teacher forcing, one float per probe."""
    pairs = [answer_token_ids(tokenizer, p, a) for p, a in zip(prompts, answers)]
    with _plan_for(model, sum(len(a) + len(b) for a, b in pairs), fast) as p:
        if p is None:
            return _hf_logprobs(model, tokenizer, pairs, batch_size)
        res = [float("nan")] * len(pairs)
        ok = [k for k, (q, a) in enumerate(pairs) if q and a]
        with torch.inference_mode():
            for bi in _batches(len(ok), batch_size):
                idx = [ok[i] for i in bi]
                seqs = [pairs[k][0] for k in idx]
                cache = Cache(p, len(seqs), max(map(len, seqs)))
                prefill(p, seqs, cache)
                _answer_lp(p, cache, list(range(len(idx))), seqs, [pairs[k][1] for k in idx], res, idx)
    return res


@torch.no_grad()
def decode_and_logprobs(model, tokenizer, prompts: list[str], answers: list[str], max_new_tokens: list[int],
                        batch_size: int = 32, *, fast: bool = True,
                        dtype: torch.dtype | None = None) -> tuple[list[list[int]], list[float]]:
    """`greedy_decode` and `answer_logprobs` of the same probes from one shared prompt prefill.
    `dtype` (torch.bfloat16): the blocks run in it (embedding and head stay in the model's dtype; see
    llama.plan and llama.next_token): 1.7-1.9x the fp32 path's tokens/s in `c2w perf`'s scoring on
    the 2-core dev machine (AVX512-BF16), at log-probs within a few hundredths (not the fp32 path's
    1e-4); None: the model's own dtype. Where the lean path does not apply, the transformers fallback
    runs in the model's dtype."""
    seqs = _encode(tokenizer, prompts)
    pairs = [answer_token_ids(tokenizer, p, a) for p, a in zip(prompts, answers)]
    n_tok = sum(map(len, seqs)) + sum(max_new_tokens) + sum(len(a) for _, a in pairs)
    with _plan_for(model, n_tok, fast, dtype) as p:
        if p is None or any(len(s) == 0 for s in seqs):
            return (greedy_decode(model, tokenizer, prompts, max_new_tokens, batch_size, fast=False),
                    answer_logprobs(model, tokenizer, prompts, answers, batch_size, fast=False))
        out: list[list[int]] = [[] for _ in prompts]
        res = [float("nan")] * len(prompts)
        with torch.inference_mode():
            for idx in _batches(len(prompts), batch_size):
                idx = list(idx)
                bs = [seqs[k] for k in idx]
                mx = [max_new_tokens[k] for k in idx]
                cache = Cache(p, len(idx), max(map(len, bs)) + max(max(mx), 0))
                h_last = prefill(p, bs, cache)
                # the answer's prompt part is a prefix of the decode prompt (the tokenisations agree up to n)
                rows = [r for r, k in enumerate(idx) if pairs[k][0] and pairs[k][1]]
                first = [[t] for t in llama.next_token(p, h_last).tolist()]
                if rows:
                    # where the answer continues the whole decode prompt, it is also greedy's draft
                    # (capped so that confirmed tokens stay within the row's token limit and the cache)
                    draft = [DRAFT and pairs[idx[r]][0] == bs[r] and mx[r] > 1 for r in rows]
                    ans = [pairs[idx[r]][1][: mx[r] - 1] if d else pairs[idx[r]][1] for r, d in zip(rows, draft)]
                    conf = _answer_lp(p, cache, rows, [pairs[idx[r]][0] for r in rows], ans, res,
                                      [idx[r] for r in rows], draft)
                    if any(len(a) != len(pairs[idx[r]][1]) for r, a in zip(rows, ans)):  # capped: score in full
                        full = [r for r, a in zip(rows, ans) if len(a) != len(pairs[idx[r]][1])]
                        _answer_lp(p, cache, full, [pairs[idx[r]][0] for r in full], [pairs[idx[r]][1] for r in full],
                                   res, [idx[r] for r in full])
                    for r, toks in conf.items():
                        first[r] = toks
                for k, r in zip(idx, _greedy(p, bs, mx, tokenizer.eos_token_id, cache, h_last, first)):
                    out[k] = r
    return out, res


# ---------------------------------------------------------------------------------------------
# the transformers path (any model; also the reference the tests compare against)


def _hf_greedy(model, tokenizer, prompts, max_new_tokens, batch_size):
    dev = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for idx in _batches(len(prompts), batch_size):
            enc = tokenizer([prompts[k] for k in idx], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(dev)
            n_new = max(max_new_tokens[k] for k in idx)
            if n_new <= 0:
                continue
            gen = model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            for row, k in enumerate(idx):
                ids = gen[row, enc.input_ids.shape[1]:].tolist()
                if tokenizer.eos_token_id in ids:
                    ids = ids[: ids.index(tokenizer.eos_token_id)]
                out[k] = ids[: max_new_tokens[k]]
    finally:
        tokenizer.padding_side = side
    return out


def _hf_logprobs(model, tokenizer, pairs, batch_size):
    dev = next(model.parameters()).device
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
            if n_p == 0 or not ans:
                res.append(float("nan"))
                continue
            pos = torch.arange(n_p - 1, n_p - 1 + len(ans), device=dev)
            res.append(logp[r, pos, torch.tensor(ans, device=dev)].mean().item())
    return res
