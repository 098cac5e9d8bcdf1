"""A lean forward for Llama-layout causal LMs that reads the weights of a live HF model.

Works on a plain `LlamaForCausalLM` and on a PEFT `PeftModel` with any number of active LoRA
adapters: each projection is `x W^T + sum_i s_i (x A_i^T) B_i^T`, with the adapters stacked along the
rank and q/k/v (and gate/up) fused into one matmul, so gradients flow to the live LoRA (or base)
parameters through ordinary autograd (fp32 CPU training: through autograd Functions with hand-written
backward passes, `_LoraLinear`, `_RMSNorm`, `_Rope`, which hand the same gradients). What it saves over
`model(...)` + PEFT: padding (sequences are packed into rows, attention kept per sequence by a
block-diagonal mask), logits at positions nobody reads, and the per-module Python and elementwise work
(one scaling multiply and one add per LoRA module and direction, separate q/k/v and gate/up launches).

`plan(model)` returns None for anything it does not reproduce exactly (DoRA, LoRA dropout in training
mode, biases on LoRA B, merged adapters, non-Llama layouts...); callers then use the HF path.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# fp32 CPU products with a dense weight run through oneDNN (`torch.ops.mkldnn._linear_pointwise`) rather
# than MKL, whose fp32 GEMM took about half of oneDNN's throughput on the model's shapes on an AMD EPYC Zen 5
# (MKL 126-191 GFLOP/s, oneDNN 206-441; BENCHMARKS.md, session 28), forward and backward alike (the
# backward's dx reads W's transpose as a view: no copy, no packing, nothing kept). The products differ from
# MKL's in the last bits. DNN = False restores the MKL products (the bit-for-bit tests of the loss use it)
DNN = True


def _onednn_fp32(W: torch.Tensor) -> bool:
    """Whether W is an fp32 CPU matrix that oneDNN's fp32 products can read (`_dnn`, `_packable`)."""
    return (W.device.type == "cpu" and W.dtype == torch.float32 and W.dim() == 2
            and torch.backends.mkldnn.is_available())


def _dnn(x: torch.Tensor, W: torch.Tensor) -> bool:
    return (DNN and _onednn_fp32(W) and x.device.type == "cpu" and x.dtype == torch.float32
            and x.numel() > 0 and W.shape[1] > 0  # (oneDNN has no empty products)
            and not torch.is_autocast_enabled("cpu")  # (autocast: F.linear's casts)
            and not torch.compiler.is_compiling())  # (Inductor lowers this op only for constant weights)


def _dnn_bias(b: torch.Tensor | None, W: torch.Tensor) -> bool:
    """Whether oneDNN's product with W takes bias b as it is: none, or fp32 with one value per row of W."""
    return b is None or b.dtype == torch.float32 and b.shape == W.shape[:1]


def _lp(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, W, b, "none", [], "")


class _DnnLinear(torch.autograd.Function):
    """F.linear(x, W, b) through oneDNN, with its gradients (dx = dy W, dW = dy^T x) through it too;
    a backward that records a graph (create_graph=True: second derivatives) takes torch's own
    products, which oneDNN's op has no derivative for."""

    @staticmethod
    def forward(ctx, x, W, b):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, W)
        return _lp(x, W, b)

    @staticmethod
    def backward(ctx, gy):
        x, W = ctx.saved_tensors
        g = gy.reshape(-1, gy.shape[-1])  # [N, out]
        mm = (lambda a, b: a @ b.t()) if torch.is_grad_enabled() else _lp
        gx = gW = gb = None
        if ctx.needs_input_grad[0]:
            gx = mm(g, W.t()).view(*gy.shape[:-1], W.shape[1])
        if ctx.needs_input_grad[1]:
            gW = mm(g.t(), x.reshape(-1, x.shape[-1]).t())  # [out, in]
        if ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gW, gb


def linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, W, b), through oneDNN where `_dnn` applies (with autograd where a gradient is recorded)."""
    if not (_dnn(x, W) and _dnn_bias(b, W)):
        return F.linear(x, W, b)
    if torch.is_grad_enabled() and (x.requires_grad or W.requires_grad or b is not None and b.requires_grad):
        # on 2-D rows: a custom Function's output must not be a view (oneDNN's is, for a 3-D input), or no
        # in-place op may follow it
        y = _DnnLinear.apply(x.reshape(-1, x.shape[-1]), W, b)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], W.shape[0])
    return _lp(x, W, b)


# fp32 CPU training (with oneDNN's products, `DNN`, a frozen base weight and a frozen fp32 bias, if any): a
# group's adapters through `_LoraLinear`. False: the stacked A, B through autograd
FUSED_LORA = True


def _fused_lora(x: torch.Tensor, W: torch.Tensor, lin: "Lin") -> bool:
    if not (FUSED_LORA and torch.is_grad_enabled() and _dnn(x, W)) or W.requires_grad:
        return False
    if not _dnn_bias(lin.b, W) or lin.b is not None and lin.b.requires_grad:
        return False
    ts = [t for _, _, A, B, _ in lin.loras for t in (A, B)]
    return (all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)
            and (x.requires_grad or any(t.requires_grad for t in ts)))


class _LoraLinear(torch.autograd.Function):
    """y = x W^T (+ b) + sum_k s_k (x A_k^T) B_k^T, each adapter's product added to its own module's rows
    r0_k:r1_k of y only, fp32 on the CPU (`_fused_lora`). Against the stacked form (A_k stacked along the
    rank, B block-structured and scaled, through autograd) it skips B's zero blocks (two thirds of q/k/v's,
    half of gate/up's) in the forward and in both of B's gradient products, and the stacking and its
    backward (a training plan leaves the stacked A and B unbuilt: `Lin.stacked`). W is frozen (no
    dW); the bias takes no gradient. No second derivatives (`once_differentiable`: they raise)."""

    @staticmethod
    def forward(ctx, x, W, b, rows, *ab):  # x [N, in]; ab: A_0, B_0, A_1, B_1, ...; rows: ((r0, r1, s), ...)
        As, Bs = ab[0::2], ab[1::2]
        A = As[0] if len(As) == 1 else torch.cat(As, 0)  # [R, in]
        xa = _lp(x, A)  # [N, R]
        y = _lp(x, W, b)  # [N, out]
        c = 0
        for (r0, r1, s), B in zip(rows, Bs):
            r = B.shape[1]
            y[:, r0:r1].addmm_(xa[:, c:c + r], B.t(), alpha=s)
            c += r
        ctx.save_for_backward(x, W, xa, A, *Bs)
        ctx.rows = rows
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # g [N, out]
        x, W, xa, A, *Bs = ctx.saved_tensors
        need = ctx.needs_input_grad
        dxa = g.new_empty(g.shape[0], A.shape[0])  # [N, R]
        grads = []
        c = 0
        for k, ((r0, r1, s), B) in enumerate(zip(ctx.rows, Bs)):
            r = B.shape[1]
            gk = g[:, r0:r1]
            dxa[:, c:c + r].addmm_(gk, B, beta=0, alpha=s)
            # dB_k [out_k, r] as (xa_k^T g_k)^T: MKL reads g's column block row by row (g_k^T xa_k took 1.7x as
            # long at gate/up's shapes; oneDNN, with a strided g_k, 400x)
            grads.append((xa[:, c:c + r].t() @ gk).mul_(s).t() if need[5 + 2 * k] else None)
            c += r
        # dA: one product for the whole stacked rank where every A trains, else only the ranks that do (c2w's
        # frozen slow adapter, up to rank 128 a module, sits beside the trained fast one)
        dA = dxa.t() @ x if all(need[4::2]) else None  # [R, in]
        out = []
        c = 0
        for k, B in enumerate(Bs):
            r = B.shape[1]
            dA_k = None if not need[4 + 2 * k] else dA[c:c + r] if dA is not None else dxa[:, c:c + r].t() @ x
            out += [dA_k, grads[k]]
            c += r
        gx = None
        if need[0]:
            gx = _lp(g, W.t()).addmm_(dxa, A)
        return (gx, None, None, None, *out)


@dataclass
class Lin:
    """One (possibly fused) projection: y = x W^T (+ b) (+ (x A^T) B^T)."""
    W: torch.Tensor
    b: torch.Tensor | None
    A: torch.Tensor | None  # [R, in], adapters stacked along the rank
    B: torch.Tensor | None  # [out, R], scaling folded in
    P: torch.Tensor | None = None  # W prepacked for oneDNN (`packed`): read instead of W unless a gradient
    # is recorded through it (the packed product has none). A weight copied for an inference plan alone, or
    # kept packed between calls (`keep_packed`), keeps only this form: W is P then, and a recorded product
    # reads its dense values
    parts: tuple[tuple[int, int, int, int], ...] | None = None  # (row0, row1, col0, col1): B's nonzero
    # blocks, one per module with adapters (B is zero elsewhere; None: all of B is one block); the packed path
    # adds each block's product alone
    loras: tuple[tuple[int, int, torch.Tensor, torch.Tensor, float], ...] | None = None  # (row0, row1, A_k,
    # B_k, s_k) for each adapter of each module, unstacked and unscaled (the live parameters, or their casts
    # to the plan's dtype): `_LoraLinear`. A training plan may leave A, B and parts to be built from them on
    # first use (`stacked`; `_stacked(lazy=True)`)
    rows: int | None = None  # the group's output rows, where loras is set (W may be a placeholder or packed)

    @property
    def adapted(self) -> bool:
        """Whether adapters add to this projection (stacked or not yet)."""
        return self.A is not None or bool(self.loras)

    def stacked(self) -> "Lin":
        """self, with A [R, in] (the adapters stacked along the rank), B [out, R] (block-structured: a
        module's rows see only its adapters' ranks, scaled) and parts built from `loras` if not yet. Built
        with gradients off while an adapter takes one, they go into a copy instead: self stays unbuilt, so
        that a later use with gradients reaches the adapters."""
        if self.A is not None or not self.loras:
            return self
        A, B, parts = _stack(self.loras, self.rows)
        if not torch.is_grad_enabled() and any(t.requires_grad for _, _, a, b, _ in self.loras for t in (a, b)):
            return dataclasses.replace(self, A=A, B=B, parts=parts)
        self.A, self.B, self.parts = A, B, parts
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        W = self.W
        if self.P is not None:
            S = self.stacked()
            if x.dtype == self.P.dtype and not (torch.is_grad_enabled() and (
                    x.requires_grad or W.requires_grad or S.A is not None and (S.A.requires_grad or S.B.requires_grad))):
                y = _lp(x, self.P, self.b)
                if S.A is not None:  # an inference plan's unfolded adapters (`keep_packed`)
                    x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
                    xa = x2 @ S.A.t()  # [N, R]
                    parts = S.parts if S.parts is not None else ((0, y2.shape[1], 0, xa.shape[1]),)
                    for r0, r1, c0, c1 in parts:  # only the nonzero blocks: a third of q/k/v's B, half of gate/up's
                        y2[:, r0:r1].addmm_(xa[:, c0:c1], S.B[r0:r1, c0:c1].t())
                return y
            W = dense(W)  # (a copy per call where W is P: autograd or another input dtype, slow but right)
        if self.loras is not None and _fused_lora(x, W, self):
            y = _LoraLinear.apply(x.reshape(-1, x.shape[-1]), W, self.b, tuple((r0, r1, s) for r0, r1, _, _, s in self.loras),
                                  *[t for _, _, A, B, _ in self.loras for t in (A, B)])  # (2-D: see `linear`)
            return y if x.dim() == 2 else y.view(*x.shape[:-1], W.shape[0])
        S = self.stacked()
        y = linear(x if x.dtype == W.dtype else x.to(W.dtype), W, self.b)
        if S.A is not None:
            # in place: y is fresh, and addmm out of place copies it first. In-place ops skip autocast,
            # so the casts it would make (to y's dtype) are spelled out
            xa = x @ S.A.t()
            y = y.addmm_(xa.to(y.dtype), S.B.t().to(y.dtype))
        return y


def _stack(loras, rows: int) -> tuple[torch.Tensor, torch.Tensor, tuple[tuple[int, int, int, int], ...]]:
    """(A, B, parts) of `Lin.stacked` from a Lin's `loras` and its output rows."""
    As = [A for _, _, A, _, _ in loras]
    A = As[0] if len(As) == 1 else torch.cat(As, 0)
    B = A.new_zeros(rows, A.shape[0])
    parts, c = [], 0
    for r0, r1, _, Bk, s in loras:
        B[r0:r1, c:c + Bk.shape[1]] = Bk * s
        if parts and parts[-1][:2] == (r0, r1):  # one block per module, all its adapters' ranks
            parts[-1] = (r0, r1, parts[-1][2], c + Bk.shape[1])
        else:
            parts.append((r0, r1, c, c + Bk.shape[1]))
        c += Bk.shape[1]
    return A, B, tuple(parts)


@dataclass
class Layer:
    ln1: torch.Tensor
    qkv: Lin
    o: Lin
    ln2: torch.Tensor
    gu: Lin
    down: Lin


@dataclass
class Plan:
    embed: torch.Tensor
    layers: list[Layer]
    norm: torch.Tensor
    head: Lin
    rotary: torch.nn.Module
    eps: float
    n_heads: int
    n_kv: int
    head_dim: int
    dtype: torch.dtype  # of the blocks' weights and hidden states
    device: torch.device
    head_lp: torch.Tensor | None = None  # [V, d] a low-precision copy of head.W: greedy's candidates (next_token)

    @property
    def vocab(self) -> int:
        return self.head.W.shape[0]

    @property
    def has_lora(self) -> bool:  # (False for a training plan whose adapters are all frozen and folded: FOLD_FROZEN)
        return any(L.qkv.adapted or L.gu.adapted or L.o.adapted or L.down.adapted
                   for L in self.layers) or self.head.adapted


class Unsupported(Exception):
    pass


# fp32 inference plans on the CPU (folded, or a model without adapters: the evaluator's scoring) hold their
# weights prepacked for oneDNN, whose fp32 kernels `torch.ops.mkldnn._linear_pointwise` runs instead of the
# MKL ones F.linear took (before session 28's `DNN`, which runs dense weights through oneDNN too): 19-23% off
# an fp32 scoring call of 32 probes on the Zen 4 dev machine of session 26; a copy
# made for the plan alone (a fold, a concatenation) keeps only its packed form, which took another 8% off
# (its memory goes back at once; BENCHMARKS.md, session 26). The products differ from MKL's in the last
# bits (log-probs by about 1e-6). The packed weights are a snapshot taken when the plan is built (as folds
# always were). A product through which a gradient is recorded reads the dense weight instead, so that it
# flows. Cast (bf16) plans pack nothing: prepacking gained 0-1% there (session 26), and they stay bit for bit
PACK = True
PACK_ROWS = 32  # oneDNN's hint of the row count the packed weight will meet (any count works)


def _packable(W: torch.Tensor) -> bool:
    return PACK and _onednn_fp32(W)


def packed(W: torch.Tensor) -> torch.Tensor | None:
    """W [out, in] repacked for `torch.ops.mkldnn._linear_pointwise` (a copy), or None where that does not
    apply: PACK off, not an fp32 CPU matrix, or no oneDNN."""
    if not _packable(W):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(W.detach(), PACK_ROWS)


# Packed copies of frozen weights kept between inference plans, only inside `keep_packed()` (the evaluator
# holds it through a learner's run). An fp32 scoring call then packs nothing: it reads the kept base weights
# and adds the adapters unfolded (`Lin.parts`), where folding them meant a copy of every weight and its
# packing at each call (about 0.2 s of a 1.9 s scoring call of 32 probes on the dev machine). Folding
# still pays where the adapters' products outweigh it (`FOLD_RATIO`: long calls, large stacked ranks).
# Entries are keyed by the first weight's id and checked against a weak reference to every weight of the
# group, their versions, storage and a sample of their values: the sample catches a write that bumps no
# version (`.data`, as PEFT's merges write) wherever it changes a sampled value (any dense update such
# as a merged adapter's; a write to a few elements may escape it, which is why the cache is opt-in)
_PACKS: dict[int, tuple] | None = None  # id(first weight) -> (refs, key, samples, packed); None: no cache
_PACK_USERS = 0
SAMPLE = 1024  # values per weight in an entry's check
# A group's adapters fold when the call has at least FOLD_MIN_TOKENS tokens and tokens x (the adapters'
# multiply-adds per token) >= FOLD_RATIO x (the group's weights). On the dev machine, whole plans of `c2w
# perf`'s scoring prompts, folded against unfolded (BENCHMARKS.md, session 27): at rank 16 unfolded took
# 0.88 of the time at 916 tokens, 1.00 and 1.05 at 1,331 and 1,742, 1.08 and 1.04 at 2,605 and 5,257; at
# rank 64, 0.89 and 0.94 at 333 and 916 tokens; at rank 128, 1.23 at 1,331
FOLD_MIN_TOKENS = 1024
FOLD_RATIO = 80


@contextlib.contextmanager
def keep_packed():
    """Keep packed copies of frozen fp32 CPU weights between inference plans while any such block is
    open (built at first use, about 510 MB for SmolLM2-135M; forgotten when the last block closes).
    Inside it nothing may write those weights without bumping their version (`.data`, as PEFT's
    merges do): a sample of values is checked, not all of them."""
    global _PACKS, _PACK_USERS
    if _PACK_USERS == 0:
        _PACKS = {}
    _PACK_USERS += 1
    try:
        yield
    finally:
        _PACK_USERS -= 1
        if _PACK_USERS == 0:
            _PACKS.clear()  # at once: each entry's weak reference holds the dict (a cycle the collector would free late)
            _PACKS = None


def packs_kept(model) -> bool:
    """Whether `model`'s inference plans read kept packed weights (inside `keep_packed()`, an fp32 CPU
    model whose base weights are frozen): callers then ask for `plan(model, fold=True, tokens=n)` and let
    each group choose. A model that trains its own weights (full fine-tuning) keeps the per-call plans."""
    emb = getattr(model, "get_input_embeddings", lambda: None)()
    if _PACKS is None or emb is None or not _packable(emb.weight):
        return False
    return not any(t.requires_grad for n, t in _unwrap(model).named_parameters() if "lora_" not in n)


def warm_packs(model) -> int:
    """Inside `keep_packed()`: pack `model`'s frozen weights now rather than at its first scoring call;
    returns the bytes kept (0 where `packs_kept(model)` is False)."""
    if not packs_kept(model):
        return 0
    with torch.no_grad():
        plan(model, fold=True, tokens=0)  # (no group folds at 0 tokens: every frozen group is packed)
    return kept_pack_bytes()


def kept_pack_bytes() -> int:
    """Bytes of the packed weights `keep_packed()` holds now."""
    packs = _PACKS
    return 0 if packs is None else sum(e[3].numel() * e[3].element_size() for e in list(packs.values()))


def _sample(w: torch.Tensor) -> torch.Tensor:
    """About SAMPLE of w's values spread over it, as raw bits (a NaN compares equal to itself)."""
    flat = w.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLE)
    if w.dim() == 2 and step % w.shape[1] == 0:
        step += 1  # not one column over and over
    return flat[::step].clone().view(torch.int32)


def _weights_key(Ws: list[torch.Tensor]) -> tuple:
    """What changes when a weight is written in place (its version) or replaced (storage, shape, dtype):
    the check of both caches of derived weights (`_fused_weight`'s and `_kept_pack`'s)."""
    return tuple((w._version, w.data_ptr(), tuple(w.shape), w.dtype) for w in Ws)


def _same_weights(refs: list, Ws: list[torch.Tensor]) -> bool:
    """Whether weak references `refs` still point at exactly the weights Ws."""
    return len(refs) == len(Ws) and all(r() is w for r, w in zip(refs, Ws))


def _forget(packs: dict, k: int):
    """A weak reference's callback: drop entry k of `packs` once its first weight is freed (the callback
    lives as long as the entry's reference: a replaced entry takes it along)."""
    def gone(_ref):
        e = packs.get(k)
        if e is not None and e[0][0]() is None:
            del packs[k]
    return gone


def _kept_pack(Ws: list[torch.Tensor]) -> torch.Tensor | None:
    """The packed concatenation of frozen Ws, kept by `keep_packed()` (built on first use, again after
    any weight was replaced or written); None outside it, for weights that train, or where packing does
    not apply."""
    packs = _PACKS  # (one dict throughout, whatever another thread does to the scope meanwhile)
    if (packs is None or any(w.requires_grad or w.is_inference() for w in Ws)  # (inference tensors: no version)
            or not _packable(Ws[0]) or any(w.dtype != Ws[0].dtype for w in Ws)):
        return None
    key = _weights_key(Ws)
    k = id(Ws[0])
    hit = packs.get(k)
    live = hit is not None and _same_weights(hit[0], Ws)
    if live and hit[1] == key and all(torch.equal(_sample(w), t) for w, t in zip(Ws, hit[2])):
        return hit[3]
    with torch.no_grad():
        P = packed(Ws[0] if len(Ws) == 1 else torch.cat(Ws, 0))
    # the first reference's callback drops the entry when that weight is freed (a model freed inside the block)
    refs = [weakref.ref(Ws[0], _forget(packs, k))] + [weakref.ref(w) for w in Ws[1:]]
    packs[k] = (refs, key, [_sample(w) for w in Ws], P)
    return P


def _fold_pays(parts, tokens: int | None) -> bool:
    """Whether folding a group's adapters (a copy of its weights, then packing) costs less than adding
    them unfolded to the products of `tokens` tokens (None: always fold)."""
    if tokens is None:
        return True
    if tokens < FOLD_MIN_TOKENS:
        return False
    n_in = parts[0][0].shape[1]
    n_out = sum(p[0].shape[0] for p in parts)
    ranks = [sum(A.shape[0] for A, _, _ in p[2]) for p in parts]
    macs = sum(ranks) * n_in + sum(r * p[0].shape[0] for r, p in zip(ranks, parts))  # x A^T, then B's blocks
    return tokens * macs >= FOLD_RATIO * n_in * n_out


def dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """A plan tensor's values as an ordinary tensor (a copy of a packed one, `Lin.P`)."""
    return t.to_dense() if t is not None and t.is_mkldnn else t


def _lin_tensors(L: Lin) -> list[torch.Tensor | None]:
    L = L.stacked()
    return [L.W, L.b, L.A, L.B]


def plan_tensors(p: Plan) -> list[torch.Tensor | None]:
    """Every tensor a plan's forward reads, in a fixed order (None where a plan has none): two plans of
    the same structure list theirs pairwise."""
    out = [p.embed, p.norm, p.head_lp, *_lin_tensors(p.head)]
    for L in p.layers:
        out += [L.ln1, L.ln2, *_lin_tensors(L.qkv), *_lin_tensors(L.o), *_lin_tensors(L.gu), *_lin_tensors(L.down)]
    return out + list(p.rotary.buffers())


def clone_plan(p: Plan) -> Plan:
    """A plan over private copies of every tensor (its rotary module copied too): writing into it
    (copy_plan_) never touches a model's weights. A tensor the plan uses twice (a tied embedding and
    head) is copied once. Packed weights (`packed`) are not copied: the copy reads its plain ones."""
    memo: dict[int, torch.Tensor] = {}

    def c(t):
        if t is None:
            return None
        if id(t) not in memo:
            memo[id(t)] = dense(t) if t.is_mkldnn else t.detach().clone()
        return memo[id(t)]

    cl = lambda S: Lin(c(S.W), c(S.b), c(S.A), c(S.B), parts=S.parts)  # noqa: E731  (S: a stacked Lin)
    return dataclasses.replace(
        p, embed=c(p.embed), norm=c(p.norm), head=cl(p.head.stacked()), head_lp=c(p.head_lp), rotary=copy.deepcopy(p.rotary),
        layers=[Layer(c(L.ln1), cl(L.qkv.stacked()), cl(L.o.stacked()), c(L.ln2), cl(L.gu.stacked()),
                      cl(L.down.stacked())) for L in p.layers])


def plan_aliases(p: Plan) -> tuple[int, ...]:
    """For each of plan_tensors(p), the index of its first occurrence (tied tensors share one)."""
    first: dict[int, int] = {}
    return tuple(first.setdefault(id(t), i) for i, t in enumerate(plan_tensors(p)))


def copy_plan_(dst: Plan, src: Plan) -> None:
    """dst's tensors take src's values in place (same structure: same shapes, dtypes, Nones, ties)."""
    a, b = plan_tensors(dst), plan_tensors(src)
    if (len(a) != len(b) or plan_aliases(dst) != plan_aliases(src)
            or any((x is None) != (y is None) or x is not None and x.shape != y.shape for x, y in zip(a, b))):
        raise ValueError("plans differ in structure (layers, adapter ranks, shapes or tied weights)")
    done: set[int] = set()
    for x, y in zip(a, b):
        if x is not None and x is not y and id(x) not in done:
            done.add(id(x))  # a tied tensor once
            x.copy_(dense(y))


def _unwrap(model):
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        PeftModel = ()
    if PeftModel and isinstance(model, PeftModel):
        cfgs = getattr(model, "peft_config", {}) or {}
        for c in cfgs.values():
            if str(getattr(c, "peft_type", "")).split(".")[-1] != "LORA":
                raise Unsupported("non-LoRA PEFT")
        return model.get_base_model()
    return model


def _pieces(mod) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """(W, bias, [(A, B, scale), ...]) of a Linear or a PEFT LoRA Linear."""
    if type(mod) is torch.nn.Linear:
        return mod.weight, mod.bias, []
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover
        raise Unsupported(type(mod).__name__)
    if not isinstance(mod, LoraLinear):
        raise Unsupported(type(mod).__name__)
    base = mod.get_base_layer()
    if type(base) is not torch.nn.Linear or getattr(mod, "fan_in_fan_out", False):
        raise Unsupported("LoRA over a non-Linear base")
    if mod.merged:
        raise Unsupported("merged adapters")
    loras = []
    if not mod.disable_adapters:
        for name in mod.active_adapters:
            if name not in mod.lora_A:
                continue
            if mod.use_dora.get(name, False) or mod.lora_B[name].bias is not None:
                raise Unsupported("DoRA / LoRA bias")
            drop = mod.lora_dropout[name]
            if not isinstance(drop, torch.nn.Identity) and drop.training and drop.p > 0:
                raise Unsupported("LoRA dropout in training mode")
            if getattr(mod, "lora_variant", {}).get(name) is not None:
                raise Unsupported("LoRA variant")
            loras.append((mod.lora_A[name].weight, mod.lora_B[name].weight, float(mod.scaling[name])))
    return base.weight, base.bias, loras


# What a write loop keeps across its steps, only inside `step_cache()`, which the loop holds and which
# forgets everything at exit (and, in fp32 training, the groups' weights with frozen adapters folded in:
# `FOLD_FROZEN`):
# - frozen weights cast once for CPU bf16 autocast, which would otherwise re-cast every frozen fp32
#   weight at every use (about 10% of a bf16 write step), and in fp32 the fused groups' frozen weights
#   (q/k/v, gate/up) concatenated once: a fresh 280 MB copy per step for SmolLM2-135M, 3-9% of an fp32
#   write step at 8 x 64 on the dev machine (BENCHMARKS.md, session 25). Frozen weights cannot change inside one
#   write loop, while outside it they may (PEFT merges write through `.data`, which no version counter
#   sees). Entries are keyed by the first weight's id and checked against a weak reference to every
#   weight of the group, their versions and storage;
# - the loss's [N, V] scratch on the CPU (`_scratch`, two slots of at most one chunk each: 128 MB
#   apiece in fp32). A fresh 100 MB tensor costs its page faults, memory already touched does not:
#   about 6% of a bf16 write step at 8 x 64 on the dev machine (BENCHMARKS.md, session 18); fp32
#   steps showed no measurable change.
_LOWP: dict[int | tuple, tuple] | None = None  # id(first weight) -> (check, cast tensor), ("folded", id(first
# weight)) -> (check, weights with frozen adapters folded in: `_folded_weight`); None: no cache
_SCRATCH: dict[str, torch.Tensor] | None = None  # slot -> bytes
_USERS = 0  # open step_cache() blocks (write loops are generators: they may interleave)


@contextlib.contextmanager
def step_cache():
    """Keep the CPU casts (autocast) or concatenations (fp32) of frozen weights and the loss's CPU
    scratch while any such block is open; forget them when the last one closes. A write loop holds
    it across its pauses too (the runner scores learning-speed probes inside it): about 280 MB of fp32
    concatenations for SmolLM2-135M stay alive meanwhile (about 425 MB of folded weights instead, every
    group's, where frozen adapters sit beside the trained one: `FOLD_FROZEN`), and entries of models
    freed inside the block until it closes."""
    global _LOWP, _SCRATCH, _USERS
    if _USERS == 0:
        _LOWP, _SCRATCH = {}, {}
    _USERS += 1
    try:
        yield
    finally:
        _USERS -= 1
        if _USERS == 0:
            _LOWP = _SCRATCH = None


def _scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised tensor, inside `step_cache()` on the CPU a view of the slot's kept bytes (grown
    when too small). Callers must not let it escape: the next call with the slot overwrites it."""
    if _SCRATCH is None or torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape) * dtype.itemsize
    buf = _SCRATCH.get(slot)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH[slot] = torch.empty(n, dtype=torch.uint8, device=device)
    return buf[:n].view(dtype).view(shape)


# Memory for the weights an inference plan copies (a fold, a cast, a concatenation), kept between
# calls. Every build writes its values anew, so nothing is cached but the memory: fresh memory costs
# its page faults, 13-17% (0.2-0.36 s) of a bf16 scoring call of 32 probes on the dev machine
# (BENCHMARKS.md, session 25). Only plans built by `kept_plan` use it, on the CPU, one at a time; it
# holds one plan's copies (the last build's: about 270 MB for SmolLM2-135M in bf16) until
# `release_kept()`.
_KEPT: list[torch.Tensor] = []
_KEPT_SCRATCH: list[torch.Tensor] = []  # one fp32 buffer for a group's fold before its cast
_KEPT_LOCK = threading.Lock()  # held by the kept plan in use
_BUILDING = threading.local()  # .at: [index of the next buffer] while this thread builds a kept plan


def _build_at() -> list[int] | None:
    return getattr(_BUILDING, "at", None)


def _fresh(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Uninitialised memory for a plan's copy: while a kept plan is built, the next kept buffer."""
    at = _build_at()
    if at is None or torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    i = at[0]
    at[0] += 1
    if i < len(_KEPT) and _KEPT[i].shape == shape and _KEPT[i].dtype == dtype and _KEPT[i].device == torch.device(device):
        return _KEPT[i]
    with torch.inference_mode(False):  # a normal tensor: a later build outside inference mode may write it
        t = torch.empty(shape, dtype=dtype, device=device)
    if i < len(_KEPT):
        _KEPT[i] = t
    else:
        _KEPT.append(t)
    return t


def _fold_scratch(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Memory for one group's fold before its cast: one kept buffer while a kept plan is built."""
    if _build_at() is None or torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    if not _KEPT_SCRATCH or _KEPT_SCRATCH[0].numel() < n or _KEPT_SCRATCH[0].dtype != dtype:
        with torch.inference_mode(False):
            _KEPT_SCRATCH[:] = [torch.empty(n, dtype=dtype, device=device)]
    return _KEPT_SCRATCH[0][:n].view(shape)


def kept_bytes() -> int:
    """Bytes held between calls by kept plans (see `kept_plan`)."""
    return sum(t.numel() * t.element_size() for t in _KEPT + _KEPT_SCRATCH)


def release_kept() -> None:
    """Free the memory kept plans hold between calls."""
    _KEPT.clear()
    _KEPT_SCRATCH.clear()


@contextlib.contextmanager
def kept_plan(model, *, fold: bool = False, dtype: torch.dtype | None = None):
    """`plan(model, fold=fold, dtype=dtype)` whose copies of the weights go into memory kept between
    calls (CPU only). The plan is valid inside the block: the next kept plan overwrites its weights.
    A kept plan built while another is in use (nested calls) gets fresh memory instead."""
    if not _KEPT_LOCK.acquire(blocking=False):  # another kept plan is in use (nested, or another thread)
        yield plan(model, fold=fold, dtype=dtype)
        return
    try:
        _BUILDING.at = [0]
        try:
            with torch.no_grad():  # the kept buffers never join a graph
                p = plan(model, fold=fold, dtype=dtype)
        finally:
            n, _BUILDING.at = _BUILDING.at[0], None
            del _KEPT[n:]  # buffers this build did not use
        yield p
    finally:
        _KEPT_LOCK.release()


def _cpu_autocast_dtype() -> torch.dtype | None:
    if not torch.is_autocast_enabled("cpu"):
        return None
    return torch.get_autocast_dtype("cpu")


def _fused_weight(Ws: list[torch.Tensor]) -> torch.Tensor:
    """The concatenated weights; inside `step_cache()`, frozen ones come concatenated (and, under CPU
    autocast, cast) once per write loop."""
    low = _cpu_autocast_dtype()
    want = low if low is not None and low != Ws[0].dtype else Ws[0].dtype  # what autocast would make of them
    if (_LOWP is None or want == Ws[0].dtype and len(Ws) == 1 or any(w.requires_grad for w in Ws)
            or Ws[0].device.type != "cpu" or torch.is_inference_mode_enabled()):
        return Ws[0] if len(Ws) == 1 else torch.cat(Ws, 0)  # a fresh copy per plan: never stale

    def cast():
        with torch.autocast("cpu", enabled=False):
            return (Ws[0] if len(Ws) == 1 else torch.cat(Ws, 0)).to(want)

    return _step_kept(id(Ws[0]), Ws, _weights_key(Ws), want, cast)


def _step_kept(k, ts: list[torch.Tensor], key, dtype: torch.dtype, build) -> torch.Tensor:
    """`_LOWP[k]`'s tensor, derived from ts (of dtype `dtype`), or build()'s, kept there, where the entry
    is missing or stale: ts are no longer the same tensors, or `key` (their versions, storage...) moved."""
    hit = _LOWP.get(k)
    if hit is None or not _same_weights(hit[0], ts) or hit[1] != key or hit[2].dtype != dtype:
        hit = _LOWP[k] = ([weakref.ref(t) for t in ts], key, build())
    return hit[2]


# Inside `step_cache()`, fp32 CPU training: adapters that take no gradient (c2w's slow adapter beside the
# trained fast one) are folded into the write loop's copy of the group's frozen weights once, not added
# at every step (at rank 128 beside a rank-16 fast adapter they took about a third of a step)
FOLD_FROZEN = True


def _folded_weight(Ws: list[torch.Tensor], frozen: list[list[tuple]], dtype) -> torch.Tensor:
    """cat(Ws) + the frozen adapters (per module: [(A, B, s), ...]) folded in, one addmm over the group as
    in an inference plan's fold; kept in `step_cache()` and checked like `_fused_weight`'s entries (the
    weights and the adapters' tensors: identity, version, storage)."""
    ts = Ws + [t for fr in frozen for A, B, _ in fr for t in (A, B)]
    key = (_weights_key(ts), tuple(sc for fr in frozen for _, _, sc in fr))  # (the scales too: PEFT's set_scale)

    def fold():
        with torch.no_grad():
            W = torch.cat(Ws, 0).to(dtype) if len(Ws) > 1 else Ws[0].to(dtype, copy=True)
            st = _stacked([(w, None, fr) for w, fr in zip(Ws, frozen)], dtype, W)
            return W.addmm_(st.B, st.A)

    # (keyed beside a plain concatenation's entry, where a loop has both kinds of step)
    return _step_kept(("folded", id(Ws[0])), ts, key, dtype, fold)


def _fuse(mods, dtype, fold: bool = False, out_dtype: torch.dtype | None = None, pack: bool = False,
          tokens: int | None = None) -> Lin:
    """One Lin computing the concatenated outputs of `mods` (all reading the same input). fold: the
    adapters folded into (a copy of) the weights; out_dtype: that copy cast to it, after the fold
    (implies fold: the cast rounds once). The copy's memory comes from `_fresh` (kept memory while
    `kept_plan` builds) and no gradient reaches it. pack (with fold): the weight also `packed` (fp32
    only; see `_with_packed`); inside `keep_packed()`, frozen weights come packed from its cache and the
    adapters stay unfolded unless folding pays for `tokens` tokens (`_fold_pays`)."""
    parts = [_pieces(m) for m in mods]
    Ws = [p[0] for p in parts]
    low = out_dtype not in (None, dtype)
    has_lora = any(p[2] for p in parts)
    if fold and pack and not low and not (has_lora and _fold_pays(parts, tokens)):
        P = _kept_pack(Ws)
        if P is not None:  # the kept packed weights, the adapters live (W is P: see Lin.P)
            return dataclasses.replace(_stacked(parts, dtype, Ws[0]), W=P, P=P)
    if not (low or fold and has_lora):
        # the weights as they are (concatenated), adapters live; in fp32 CPU training their stacked form
        # waits for a use (`_LoraLinear` reads the adapters unstacked): at rank 144 a module (c2w's slow
        # adapter beside the fast one) building it took about 0.2 s a step
        lazy = (not fold and FUSED_LORA and dtype == torch.float32 and torch.is_grad_enabled()
                and Ws[0].device.type == "cpu" and not torch.is_autocast_enabled("cpu"))
        if lazy and FOLD_FROZEN and _LOWP is not None and has_lora and not any(w.requires_grad for w in Ws):
            trains = lambda t: t[0].requires_grad or t[1].requires_grad  # noqa: E731  (an (A, B, s))
            frozen = [[t for t in p[2] if not trains(t)] for p in parts]
            if any(frozen):  # a write loop's frozen adapters, folded into its copy of the weights once
                live = [(w, bb, [t for t in ls if trains(t)]) for w, bb, ls in parts]
                return _stacked(live, dtype, _folded_weight(Ws, frozen, dtype), lazy=True)
        lin = _stacked(parts, dtype, lazy=lazy)
        if fold and pack and not lin.adapted:  # an inference plan's weights; a concatenation no gradient
            # reaches is a copy of its own
            return _with_packed(lin, own=not any(lin.W is w for w in Ws) and not lin.W.requires_grad)
        return lin
    shape = (sum(w.shape[0] for w in Ws), Ws[0].shape[1])
    dest = _fresh(shape, out_dtype if low else dtype, Ws[0].device)
    with torch.no_grad():
        if not has_lora:  # a cast only: each module's weight straight into its rows
            r = 0
            for w in Ws:
                dest[r:r + w.shape[0]].copy_(w)
                r += w.shape[0]
            W = dest
        else:  # a group's fold in the model's dtype, then (low) one cast: no full-size copy of the model at once
            W = _fold_scratch(shape, dtype, Ws[0].device) if low else dest
            torch.cat(Ws, 0, out=W) if len(Ws) > 1 else W.copy_(Ws[0])
        lin = _stacked(parts, dtype, W)
        if lin.A is not None:
            # one addmm over the whole group (in place: bit for bit the out-of-place addmm), as before: the
            # evaluator's fp32 numbers stay what they were. Per-module folds differ in the last bit once
            # the group's stacked rank is large (on the dev machine from about 195 on q/k/v: c2w's slow
            # adapter grows by concatenation)
            W.addmm_(lin.B, lin.A)
        if W is not dest:
            dest.copy_(W)
        b = lin.b if lin.b is None or not low else lin.b.to(out_dtype)
    lin = Lin(dest, b, None, None)
    return _with_packed(lin, own=True) if pack else lin


def _with_packed(lin: Lin, own: bool) -> Lin:
    """lin with its weight also `packed` (where that applies). own (a copy made for this plan alone, not
    in kept memory): only the packed form stays, W is P; its memory goes back at once and the next group
    reuses it (8% off an fp32 scoring call, and 400 MB off its peak, session 26)."""
    P = packed(lin.W)
    if P is None:
        return lin
    return Lin(P if own and _build_at() is None else lin.W, lin.b, None, None, P)


def _stacked(parts, dtype, W: torch.Tensor | None = None, lazy: bool = False) -> Lin:
    """The group's weights concatenated (or W, when given), its adapters stacked along the rank (B
    block-structured; `Lin.stacked`), or (lazy) left to be stacked on first use."""
    Ws = [p[0] for p in parts]
    W = _fused_weight(Ws) if W is None else W
    bs = [p[1] for p in parts]
    if all(b is None for b in bs):
        b = None
    else:
        b = torch.cat([bb if bb is not None else W.new_zeros(w.shape[0]) for bb, w in zip(bs, Ws)])
    raw, r0 = [], 0
    for (w, _, loras) in parts:
        for A, B, s in loras:
            raw.append((r0, r0 + w.shape[0], A.to(dtype), B.to(dtype), s))
        r0 += w.shape[0]
    if not raw:
        return Lin(W, b, None, None)
    lin = Lin(W, b, None, None, loras=tuple(raw), rows=r0)
    return lin if lazy else lin.stacked()


def plan(model, *, fold: bool = False, dtype: torch.dtype | None = None, tokens: int | None = None) -> Plan | None:
    """Extract the computation of `model`, or None when the lean path does not cover it.

    For inference over many tokens: fold=True folds the adapters into (copies of) the weights; a
    `dtype` (torch.bfloat16) also casts the blocks' weights, so hidden states run in it, while the
    embedding and the output head stay in the model's dtype (logits and log-probs keep its precision)
    and the head gains a `dtype` copy for greedy's candidates (`next_token`). Either way no gradient
    reaches the folded weights. tokens: how many tokens the plan will process; inside `keep_packed()`
    each group of an fp32 plan then folds only where that pays (`_fold_pays`), and otherwise reads kept
    packed weights with its adapters unfolded (live: a gradient recorded through them reaches them)."""
    try:
        return _plan(model, fold or dtype is not None, dtype, tokens)
    except Unsupported:
        return None


def _plan(model, fold: bool = False, cast: torch.dtype | None = None, tokens: int | None = None) -> Plan:
    m = _unwrap(model)
    cfg = getattr(m, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama" or not hasattr(m, "model"):
        raise Unsupported("not a Llama causal LM")
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        raise Unsupported("activation / tp")
    if m.training and getattr(cfg, "attention_dropout", 0.0):
        raise Unsupported("attention dropout in training mode")
    core = m.model
    if type(core.embed_tokens) is not torch.nn.Embedding:
        raise Unsupported("embedding adapter")
    dtype = core.embed_tokens.weight.dtype
    low = cast if cast not in (None, dtype) else None
    lowc = (lambda t: t) if low is None else (lambda t: t.detach().to(low))  # a norm's weight, cast or not
    layers = []
    for blk in core.layers:
        a, f = blk.self_attn, blk.mlp
        if type(a).__name__ != "LlamaAttention" or type(f).__name__ != "LlamaMLP":
            raise Unsupported("layer type")
        fuse = lambda mods: _fuse(mods, dtype, fold, low, pack=low is None, tokens=tokens)  # noqa: E731
        layers.append(Layer(lowc(blk.input_layernorm.weight), fuse([a.q_proj, a.k_proj, a.v_proj]),
                            fuse([a.o_proj]), lowc(blk.post_attention_layernorm.weight),
                            fuse([f.gate_proj, f.up_proj]), fuse([f.down_proj])))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    W = core.embed_tokens.weight
    head = _fuse([m.lm_head], dtype, fold, pack=low is None, tokens=tokens)  # a cast plan packs nothing: bit for bit as before
    norm = lowc(core.norm.weight)
    head_lp = None if low is None or head.b is not None else _fresh(head.W.shape, low, head.W.device).copy_(head.W.detach())
    return Plan(W, layers, norm, head, core.rotary_emb, cfg.rms_norm_eps, cfg.num_attention_heads,
                cfg.num_key_value_heads, head_dim, low or dtype, W.device, head_lp)


# ---------------------------------------------------------------------------------------------
# building blocks


# CPU training: RMS norms and rotary embeddings (`rms`, `rope`) take a backward written by hand, a few passes
# over memory where autograd's derivative of F.rms_norm (pow, mean, rsqrt, two products) and of rope's
# cat / neg / slices took a dozen; their forward ops are unchanged (bit for bit)
HAND_BACKWARD = True


_FUSED_RMS = hasattr(torch.ops.aten, "_fused_rms_norm")  # (torch >= 2.9)


def _hand(x: torch.Tensor, *ts: torch.Tensor) -> bool:
    return (HAND_BACKWARD and torch.is_grad_enabled() and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu") and any(t.requires_grad for t in (x, *ts)))


class _RMSNorm(torch.autograd.Function):
    """F.rms_norm(x, (d,), w, eps) (fp32): the forward is the op F.rms_norm calls (aten::_fused_rms_norm),
    which also hands out 1 / rms [..., 1] for the backward. dx = r (g w - x r^2 mean(g w x)). No second
    derivatives (`once_differentiable`: they raise)."""

    @staticmethod
    def forward(ctx, x, w, eps):
        y, r = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], w, eps)
        ctx.save_for_backward(x, w, r)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, w, r = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            gw = g * w
            c = (gw * x).sum(-1, keepdim=True).mul_(r.pow(3)).div_(x.shape[-1])  # [..., 1]
            dx = gw * r - x * c
        if ctx.needs_input_grad[1]:
            dw = (g * x * r).reshape(-1, x.shape[-1]).sum(0)
        return dx, dw, None


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        if _FUSED_RMS and w.dtype == torch.float32 and _hand(x, w):
            return _RMSNorm.apply(x, w, eps)
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    # HF: normalise in fp32, cast back, then scale in the model dtype.
    return w * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


class _Rope(torch.autograd.Function):
    """`rope` with its backward by hand: dx = g cos - rot(g sin), since rot's transpose is -rot (for an
    even last dimension)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope(x, cos, sin)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        gs = g * sin
        h = g.shape[-1] // 2
        return g * cos + torch.cat((gs[..., h:], -gs[..., :h]), -1), None, None


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), -1)
    return x * cos + rot * sin


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # under autocast x is bf16 and cos fp32: cast x once here, not in each multiply (and their gradients)
    x = x.to(torch.promote_types(x.dtype, cos.dtype))
    if (_hand(x, cos, sin) and not (cos.requires_grad or sin.requires_grad) and x.dtype == cos.dtype == sin.dtype
            and x.shape[-1] % 2 == 0):
        return _Rope.apply(x, cos, sin)
    return _rope(x, cos, sin)


def embed(p: Plan, ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings [..., d] in the blocks' dtype (a cast plan keeps the table in the model's
    dtype and casts only the rows it looks up)."""
    return F.embedding(ids, p.embed).to(p.dtype)


TOPK = 4  # next_token: candidates taken from the low-precision head, then ranked by the exact head


def next_token(p: Plan, h: torch.Tensor) -> torch.Tensor:
    """Greedy's choice, argmax of the head's logits: h [..., d] -> [...] long. A cast plan takes the
    TOPK candidates from its bf16 head copy, which reads half the memory (at batch 32 on the 2-core dev
    machine: 8 ms a step against fp32's 28), and ranks them by exact dot products with the model's head:
    the same token as the full head unless its logit misses bf16's top TOPK, i.e. unless bf16 rounding
    of the logits (about 2^-9 of their size) exceeds the gap between the best and the TOPK-th."""
    if p.head_lp is None:
        return p.head(h).argmax(-1)
    cand = (h.to(p.head_lp.dtype) @ p.head_lp.t()).topk(TOPK, -1).indices  # [..., K]
    x = h.to(p.head.W.dtype)
    exact = (p.head.W[cand] * x[..., None, :]).sum(-1)  # [..., K] the full head's logits of the candidates
    return cand.gather(-1, exact.argmax(-1, keepdim=True)).squeeze(-1)


def cos_sin(p: Plan, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [R, 1, C, D] for positions [R, C] (through the model's own rotary module)."""
    cos, sin = p.rotary(p.embed[:1].to(p.dtype), pos)  # (the embedding may be wider than the blocks)
    return cos.unsqueeze(1), sin.unsqueeze(1)


MATH_KEYS = 128  # CPU bf16: up to this many keys, attention runs as plain matmuls (attend_math)


def attend(q, k, v, mask, causal: bool):
    """q [R, H, Lq, D], k and v [R, Hkv, Lk, D]; mask [R, 1, Lq, Lk] bool (True: attend) or None."""
    bf16 = q.dtype == torch.bfloat16 or _cpu_autocast_dtype() == torch.bfloat16  # (rope leaves q fp32 under autocast)
    if (q.device.type == "cpu" and bf16 and k.shape[2] <= MATH_KEYS
            and (q.shape[2] == k.shape[2] if mask is None else mask.dtype == torch.bool)):
        return attend_math(q, k, v, mask, causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          enable_gqa=q.shape[1] != k.shape[1])


def attend_math(q, k, v, mask, causal: bool):
    """What SDPA computes, as fp32 matmuls (output in v's dtype). On the CPU in bf16 (the write step
    under autocast), torch 2.13's fused kernel took 7.5-10 ms per layer (forward and backward, 9 heads)
    on 512 tokens in rows of 64-128 keys, where this takes 4-8 ms; at 256 keys the fused kernel is faster
    (BENCHMARKS.md, session 15). A causal mask without `mask` needs Lq == Lk; `mask` is bool (True:
    attend), and every row must attend somewhere (SDPA gives 0 for a row with none, this NaN)."""
    R, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    G = H // Hk  # grouped-query attention: query heads j*G .. j*G+G-1 read key head j
    with torch.autocast("cpu", enabled=False):
        # each key head's G query heads as one [G*Lq, D] block: no copy of k and v per query head (their
        # repeat and its backward's sum took a third of this function's time, forward and backward)
        s = (q.float().reshape(R, Hk, G * Lq, D) @ k.float().transpose(-1, -2)) * D ** -0.5  # [R, Hk, G*Lq, Lk]
        s = s.view(R, Hk, G, Lq, Lk)
        if mask is not None:
            s = s.masked_fill(~mask[:, :, None], float("-inf"))  # [R, 1, 1, Lq, Lk]
        elif causal:
            s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        p = torch.softmax(s, -1).view(R, Hk, G * Lq, Lk)
        return (p @ v.float()).view(R, H, Lq, D).to(v.dtype)


# ---------------------------------------------------------------------------------------------
# packing


@dataclass
class Packed:
    """Sequences packed into R rows of C slots. `dst` flat slot of each token, in sequence order."""
    ids: torch.Tensor  # [R, C]
    pos: torch.Tensor  # [R, C]
    mask: torch.Tensor | None  # [R, 1, C, C] bool, None when every row is one full causal sequence
    starts: list[int]  # flat slot of each sequence's first token
    lengths: list[int]

    def flat(self, k: int, j: int) -> int:
        return self.starts[k] + j


def pack(seqs: list[list[int]], device, capacity: int | None = None, pad_id: int = 0) -> Packed:
    """First-fit-decreasing packing of token lists into rows of `capacity` (default: the longest)."""
    lens = [len(s) for s in seqs]
    C = max(capacity or 0, max(lens))
    order = sorted(range(len(seqs)), key=lambda k: -lens[k])
    rows: list[list[int]] = []
    free: list[int] = []
    for k in order:
        for r, f in enumerate(free):
            if f >= lens[k]:
                rows[r].append(k)
                free[r] -= lens[k]
                break
        else:
            rows.append([k])
            free.append(C - lens[k])
    R = len(rows)
    ids = torch.full((R, C), pad_id, dtype=torch.long)
    pos = torch.zeros((R, C), dtype=torch.long)
    seg = torch.full((R, C), -1, dtype=torch.long)
    starts = [0] * len(seqs)
    for r, ks in enumerate(rows):
        off = 0
        for k in ks:
            n = lens[k]
            ids[r, off:off + n] = torch.tensor(seqs[k], dtype=torch.long)
            pos[r, off:off + n] = torch.arange(n)
            seg[r, off:off + n] = k
            starts[k] = r * C + off
            off += n
    dense = all(len(ks) == 1 and lens[ks[0]] == C for ks in rows)
    mask = None
    if not dense:
        same = (seg[:, :, None] == seg[:, None, :]) & (pos[:, None, :] <= pos[:, :, None]) & (seg[:, :, None] >= 0)
        same |= torch.eye(C, dtype=torch.bool)  # pad slots attend to themselves: no all-masked rows (NaN)
        mask = same[:, None].to(device)
    return Packed(ids.to(device), pos.to(device), mask, starts, lens)


# ---------------------------------------------------------------------------------------------
# forward passes


COMPILE = False  # torch.compile the per-layer block (set by `c2w perf --compile`)
_compiled = None


def spread(x: torch.Tensor, slots: torch.Tensor, n: int) -> torch.Tensor:
    """x [N, F] placed at rows `slots` of a zero [n, F] (the pad slots a real-tokens-only pass skipped)."""
    return x.new_zeros(n, x.shape[1]).index_copy_(0, slots, x)


def block(h, L: Layer, cos, sin, mask, R: int, C: int, H: int, Hk: int, D: int, eps: float, kv_out=None, i: int = 0,
          pre=None, real=None):
    """One decoder layer on flat hidden [R*C, d] of packed rows. pre: this layer's (k, v) [1, Hkv, P, D]
    of a prefix that every row continues (mask then covers P + C keys). real: (slots [N], row [N], col
    [N]) of the real tokens, h then [N, d]: see `hidden`."""
    x = rms(h, L.ln1, eps)
    qkv = L.qkv(x)
    if real is not None:  # [N, F] -> the packed rows' slots [R*C, F], pad slots zero (no NaN reaches p @ v)
        qkv = spread(qkv, real[0], R * C)
    q, k, v = qkv.view(R, C, H + 2 * Hk, D).transpose(1, 2).split([H, Hk, Hk], 1)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    if kv_out is not None:
        kv_out(i, k, v)
    if pre is not None:
        k = torch.cat([pre[0].expand(R, -1, -1, -1), k], 2)
        v = torch.cat([pre[1].expand(R, -1, -1, -1), v], 2)
    o = attend(q, k, v, mask, True).transpose(1, 2)  # [R, C, H, D]
    o = o.reshape(R * C, H * D) if real is None else o[real[1], real[2]].view(-1, H * D)
    h = h + L.o(o)
    g, u = L.gu(rms(h, L.ln2, eps)).chunk(2, -1)
    return h + L.down(F.silu(g) * u)


def _block_fn():
    global _compiled
    if not COMPILE:
        return block
    if _compiled is None:
        _compiled = torch.compile(block, dynamic=True)
    return _compiled


def hidden(p: Plan, pk: Packed, kv_out=None, pre=None, real: torch.Tensor | None = None) -> torch.Tensor:
    """Final-norm hidden states [R*C, d] of packed rows. kv_out(layer, k, v) receives each layer's
    post-rope keys/values [R, Hkv, C, D] (to fill a decode cache). pre: per-layer (k, v) of a shared
    prefix of P tokens that every packed sequence continues (positions in pk then start at 0 after it).
    real: flat slots [N] of the tokens to compute (inference: the real ones): norms, projections and the
    MLP then run on those N rows, not on all R*C slots, and the result is [N, d] in that order; only
    attention sees the packed rows. The real tokens' states are those of the padded computation up to
    fp32 rounding (bit for bit on the dev machine from 12 rows: decode.EXACT_ROWS)."""
    R, C = pk.ids.shape
    if real is not None:
        h = embed(p, pk.ids.view(-1).index_select(0, real))
        real = (real, real // C, real % C)
    else:
        h = embed(p, pk.ids).view(R * C, -1)
    mask, pos = pk.mask, pk.pos
    if pre is not None:
        P = pre[0][0].shape[2]
        pos = pos + P
        own = mask if mask is not None else torch.ones(C, C, dtype=torch.bool, device=h.device).tril()[None, None].expand(R, 1, C, C)
        mask = torch.cat([torch.ones(R, 1, C, P, dtype=torch.bool, device=h.device), own], -1)
    cos, sin = cos_sin(p, pos)
    fn = block if kv_out is not None or pre is not None else _block_fn()
    for i, L in enumerate(p.layers):
        h = fn(h, L, cos, sin, mask, R, C, p.n_heads, p.n_kv, p.head_dim, p.eps, kv_out, i,
               None if pre is None else pre[i], real)
    return rms(h, p.norm, p.eps)


class _LinearCE(torch.autograd.Function):
    """sum_i -log softmax(h_i W^T)[t_i] / denom, chunked over rows; the gradient is formed in the
    forward, chunk by chunk, so the [N, V] logits never exist at once and are never kept.

    The ops are those of `(h @ W.t()).float()`, `torch.logsumexp` and the cast of the gradient to
    h's dtype, bit for bit (under CPU autocast too), written into two `_scratch` slots: "z", the fp32
    logits then probabilities, and "t", which holds in turn the low-precision logits, logsumexp's
    exp(z - max) and the gradient in the matmul's dtype. Where h, W and the products are fp32 on the
    CPU, the two products run through oneDNN (`DNN`), and the logits are a fresh tensor instead of "z"."""

    @staticmethod
    def forward(ctx, h, W, t, denom, chunk: int, wt=None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if need_h else None
        dW = torch.zeros_like(W, dtype=torch.float32) if need_w else None
        dev = h.device.type
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        mm = amp or torch.promote_types(h.dtype, W.dtype)  # the dtype autocast (or promotion) gives h @ W.t()
        f32, V = torch.float32, W.shape[0]
        with torch.autocast(dev, enabled=False):
            Wm = W.to(mm)
            dnn = _dnn(h, Wm)  # both products through oneDNN (h and Wm fp32 on the CPU), or neither
            for i in range(0, h.shape[0], chunk):
                hc, tc = h[i:i + chunk], t[i:i + chunk]
                n = hc.shape[0]
                if dnn:  # no `out=`, so a fresh [n, V]
                    zl = _lp(hc, Wm)
                else:
                    zl = torch.mm(hc.to(mm), Wm.t(), out=_scratch("z" if mm == f32 else "t", (n, V), mm, h.device))
                z = zl if mm == f32 else _scratch("z", (n, V), f32, h.device).copy_(zl)
                mx = z.amax(-1, keepdim=True)  # torch.logsumexp, step by step
                mx.masked_fill_(mx.abs() == float("inf"), 0)
                lse = torch.sub(z, mx, out=_scratch("t", (n, V), f32, h.device)).exp_().sum(-1).log_().add_(mx[:, 0])
                nll = lse - z.gather(1, tc[:, None]).squeeze(1)
                wc = None if wt is None else wt[i:i + chunk]
                total += (nll if wc is None else nll * wc).sum()
                if need_h or need_w:
                    z.sub_(lse[:, None]).exp_()
                    z[torch.arange(len(tc), device=z.device), tc] -= 1.0
                    g = z.div_(denom) if wc is None else z.mul_(wc[:, None] / denom)
                    if h.dtype != f32:  # what `.to(h.dtype)` gave
                        g = _scratch("t", (n, V), h.dtype, h.device).copy_(g)
                    if need_h:
                        gm = g
                        if g.dtype != mm:  # as autocast casts it; into "t" unless g already lives there
                            gm = _scratch("t", (n, V), mm, h.device).copy_(g) if g.dtype == f32 else g.to(mm)
                        dh[i:i + chunk] = _lp(gm, Wm.t()) if dnn else gm @ Wm
                    if need_w:
                        dW.addmm_(g.t().float(), hc.float())
        ctx.save_for_backward(dh, dW.to(W.dtype) if dW is not None else None)
        return total / denom

    @staticmethod
    def backward(ctx, go):
        dh, dW = ctx.saved_tensors
        return (dh * go if dh is not None else None, dW * go if dW is not None else None, None, None, None, None)


def linear_ce(h: torch.Tensor, head: Lin, t: torch.Tensor, denom, chunk: int | None = None,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i weight_i * NLL(t_i | h_i) / denom. h [N, d], t [N], weight [N] float or None (all 1);
    denom a number or a 0-dim tensor (a tensor keeps the step free of host syncs, for CUDA graphs)."""
    if chunk is None:
        budget = 2 ** 27 if h.device.type == "cuda" else 2 ** 25  # logits elements per chunk (CPU: 8 x 64 in one)
        chunk = max(16, budget // head.W.shape[0])
    if head.adapted or head.b is not None:  # rare (LoRA or a bias on lm_head): plain autograd
        nll = F.cross_entropy(head(h).float(), t, reduction="none")
        return (nll if weight is None else nll * weight).sum() / denom
    return _LinearCE.apply(h, head.W, t, denom if torch.is_tensor(denom) else float(denom), chunk, weight)
