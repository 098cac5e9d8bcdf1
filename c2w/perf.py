"""`c2w perf`: c2w's write and scoring paths against a plain transformers + PEFT loop, in one process.

Both sides get the same model shape (SmolLM2-135M, random init unless --real-weights), the same LoRA
(r=16, alpha=32, all linear layers), the same batches and device. Runs alternate plain / c2w for
`repeats` rounds after one warm-up each; medians are reported, since other jobs may share the CPU.

  write     one LoRA step on B x L tokens. plain: PeftModel(input_ids, labels=) -> loss.backward()
            -> AdamW.step(). c2w: what the trainer runs: lm_loss -> backward -> clip -> fused AdamW;
            with --cuda-graphs, that step (dense_loss, unpacked) captured once and replayed
            (c2w.fast.graphed; the trainer does not use it yet).
  write_var the same with variable-length texts (L/4..L tokens) right-padded to the longest, as the
            trainer's batches are; tokens/s counts real tokens.
  scoring   probe scoring of 32 prompts (12-30 tokens, answers 1-4 tokens): teacher-forced answer
            log-prob + greedy decode of answer length + 4 tokens. plain: full-logits forward on the
            padded batch + model.generate; c2w: decode_and_logprobs.
  scoring_chat  the same prompts behind one shared ~20-token system prefix (chat-format probes).
  decode    greedy decoding of 32 new tokens at batch 1 and batch 32. plain: model.generate.

Each workload also reports how closely the two paths agree (loss / log-prob differences, share of
identical greedy tokens), peak memory (CUDA: allocator peak; CPU: peak RSS growth over the step,
sampled every 2 ms after malloc_trim), and MFU: the task's model FLOPs (write: 4 x params + 6 x LoRA
params per real token; inference: 2 x params per prompt, answer and generated token, counted once,
the same numerator for both paths) over the time, against the square-GEMM throughput measured in the
same process (the fraction of what this machine's GEMM reaches right now, not of a datasheet number;
in fp32 on the CPU the best of MKL's and oneDNN's kernels),
in the dtype the path's matmuls run in (on the CPU, a path under bf16 autocast or with bf16 weights
is held against the bf16 GEMM, which runs about twice as fast here as fp32's). With --profile, each
path's step also runs under torch.profiler after the timed rounds (c2w.perf_profile: its time by kind).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import os
import random
import statistics
import time
from dataclasses import dataclass

import torch

from c2w.evaluation.memory import PeakMemory
from c2w.perf_args import WORKLOADS, add_perf_parser  # noqa: F401  (re-exported)
from c2w.perf_profile import format_profile, profile_step

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
WORDS = ("the river town lies on banks of a valley north old stone bridge market where people trade grain "
         "and wool every spring she was born in city near coast worked as botanist for many years before "
         "moving to capital his brother wrote books about ships").split()
SYSTEM = "You are a helpful assistant. Answer each question with a short fact and nothing else."


# ---------------------------------------------------------------------------------------------
# measuring


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMem(PeakMemory):
    """PeakMemory sampled every 2 ms, after malloc_trim hands an earlier workload's freed heap back
    to the OS (else the start RSS would hide this block's growth)."""

    def __init__(self, dev: torch.device):
        super().__init__(dev, interval=0.002)

    def __enter__(self):
        if self.device.type != "cuda":
            _trim()
        return super().__enter__()


def matmul_peak(dev: torch.device, dtype: torch.dtype, n: int | None = None, rounds: int = 3) -> float:
    """FLOP/s of a square GEMM on this device now (best of `rounds`, and of the kernels at hand): the MFU
    denominator. `c2w perf` measures it again in every timed round, so that MFU compares with what the
    GEMM reached under the same load (other jobs may share the CPU). In fp32 on the CPU the kernels are
    MKL's (`a @ b`) and oneDNN's, on a dense and on a packed weight (what c2w's paths run): on the AMD
    EPYC Zen 5 dev machine, oneDNN's reached about twice MKL's (BENCHMARKS.md, session 28)."""
    n = n or (4096 if dev.type == "cuda" else 1024)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    kernels = [lambda: a @ b]
    from c2w.fast import llama

    if llama._onednn_fp32(b):  # (packed with this product's row count as oneDNN's hint)
        P = torch.ops.mkldnn._reorder_linear_weight(b, n)
        kernels += [lambda: llama._lp(a, b), lambda: llama._lp(a, P)]
    per = 2 if dev.type == "cpu" else 20
    ts = []
    for _ in range(rounds):
        for k in kernels:
            _sync(dev)
            t = time.perf_counter()
            for _ in range(per):
                k()
            _sync(dev)
            ts.append((time.perf_counter() - t) / per)
    return 2 * n ** 3 / min(ts)


@dataclass
class Side:
    name: str
    fn: object  # () -> None, one step
    tokens: int  # tokens per step (real tokens for training, processed tokens for inference)
    flops: float  # model FLOPs per step
    times: list
    peak: int = 0
    bf16: bool = False  # CPU: its matmuls run in bf16 (autocast, bf16 weights): MFU against the bf16 GEMM


def _compare(dev, sides: list[Side], repeats: int, probe) -> dict:
    """Warm-up (with peak memory), then `repeats` rounds of plain / c2w, each round preceded by a GEMM
    probe (`probe(bf16)`: the model's dtype, or bf16 where a side runs in it); MFU is against the
    median probe of the side's own dtype."""
    for s in sides:  # warm-up, with peak memory
        with PeakMem(dev) as pm:
            s.fn()
            _sync(dev)
        s.peak = pm.peak_bytes
    kinds = sorted({s.bf16 for s in sides})
    rates: dict[bool, list[float]] = {k: [] for k in kinds}
    for _ in range(repeats):
        for k in kinds:
            rates[k].append(probe(k))
        for s in sides:
            _sync(dev)
            t = time.perf_counter()
            s.fn()
            _sync(dev)
            s.times.append(time.perf_counter() - t)
    peak = {k: statistics.median(v) for k, v in rates.items()}
    out = {("gemm_bf16_gflops" if k else "gemm_gflops"): v / 1e9 for k, v in peak.items()}
    for s in sides:
        med = statistics.median(s.times)
        out[s.name] = dict(tokens=s.tokens, tokens_per_s=s.tokens / med, ms_per_step=1e3 * med, mfu=s.flops / med / peak[s.bf16],
                           peak_mem_mb=s.peak / 2 ** 20, times_s=[round(t, 4) for t in s.times])
        if PROFILE_STEPS:  # after the timed rounds, so the profiler's overhead is not in them
            out[s.name]["profile"] = profile_step(s.fn, dev, PROFILE_STEPS)
    return out


PROFILE_STEPS = 0  # steps profiled per path after the timed rounds (set by `c2w perf --profile`)


def _result(stats: dict, **extra) -> dict:
    p, c = stats["plain"], stats["c2w"]
    # each round times plain then c2w back to back: the ratio within a round shares the machine's load
    rounds = [(c["tokens"] / tc) / (p["tokens"] / tp) for tp, tc in zip(p["times_s"], c["times_s"])]
    gemm = {k: stats.pop(k) for k in ("gemm_gflops", "gemm_bf16_gflops") if k in stats}
    return dict(plain=p["tokens_per_s"], c2w=c["tokens_per_s"], ratio=c["tokens_per_s"] / p["tokens_per_s"],
                ratio_rounds=[round(r, 3) for r in rounds], **gemm, detail=stats, **extra)


# ---------------------------------------------------------------------------------------------
# workloads


def _models(base, lora_kw: dict, n: int = 2):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **lora_kw)
    out = []
    for _ in range(n):
        torch.manual_seed(0)
        out.append(get_peft_model(copy.deepcopy(base), cfg))
    return out


def _texts(tokenizer, rng: random.Random, lo: int, hi: int, n: int) -> list[str]:
    """n word strings of lo..hi tokens each."""
    out = []
    for _ in range(n):
        want = rng.randint(lo, hi)
        words: list[str] = []
        while len(tokenizer(" ".join(words), add_special_tokens=False).input_ids) < want:
            words.append(rng.choice(WORDS))
        ids = tokenizer(" ".join(words), add_special_tokens=False).input_ids[:want]
        out.append(tokenizer.decode(ids))
    return out


def bench_write(base, tok, dev, B: int, L: int, repeats: int, peak, n_params: int, var: bool, lora_kw,
                graphs: bool = False, bf16: bool = False, plain_bf16: bool = False) -> dict:
    from c2w.fast import lm_loss, make_optimizer
    from c2w.fast.llama import step_cache
    from c2w.fast.loss import dense_loss, next_token_targets

    plain_m, fast_m = _models(base, lora_kw)
    plain_m.train()
    fast_m.train()
    pp = [p for p in plain_m.parameters() if p.requires_grad]
    fp = [p for p in fast_m.parameters() if p.requires_grad]
    plain_opt = torch.optim.AdamW(pp, lr=1e-4, weight_decay=0.0)
    fast_opt = make_optimizer(fp, lr=1e-4, **(dict(capturable=True) if graphs else {}))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (B, L), generator=g)
    att = torch.ones_like(ids)
    if var:
        lens = torch.randint(max(2, L // 4), L + 1, (B,), generator=g)
        lens[0] = L
        att = (torch.arange(L)[None] < lens[:, None]).long()
        ids = ids.masked_fill(att == 0, tok.pad_token_id)
    ids, att = ids.to(dev), att.to(dev)
    labels = ids.masked_fill(att == 0, -100)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    # --bf16-writes on the CPU: c2w's step as the trainer runs it with LearnerConfig.bf16_writes;
    # --plain-bf16: the plain loop under the same autocast (like for like), else it stays fp32
    c2w_amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 and dev.type == "cpu" else amp
    amp = _plain_amp(dev, plain_bf16, amp)

    def plain():
        with amp:
            loss = plain_m(input_ids=ids, attention_mask=att, labels=labels).loss
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def fast():
        with c2w_amp:
            loss = lm_loss(fast_m, ids, att, att.bool())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(fp, 1.0)
        fast_opt.step()
        fast_opt.zero_grad(set_to_none=True)

    # agreement before any step: the loss and the LoRA gradients of both paths (with --cuda-graphs,
    # of the graph's own loss, dense_loss, run eagerly)
    weight = next_token_targets(att).float()
    with amp:
        l_plain = plain_m(input_ids=ids, attention_mask=att, labels=labels).loss
    with c2w_amp:
        l_fast = dense_loss(fast_m, ids, weight) if graphs else lm_loss(fast_m, ids, att, att.bool())
    l_plain.backward()
    l_fast.backward()
    # keep floats, not the losses: a live autograd graph from the default stream would pin its
    # gradient accumulators to that stream, and a CUDA graph captured later could not use them
    l_plain, l_fast = l_plain.item(), l_fast.item()
    gdiff = max(float((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp(min=1e-12)) for a, b in zip(fp, pp))
    plain_opt.zero_grad(set_to_none=True)
    fast_opt.zero_grad(set_to_none=True)
    extra = {}
    if graphs:  # the c2w side becomes the captured step: forward, backward, clip and AdamW in one replay
        from c2w.fast.graphed import GraphedWriteStep

        t = time.perf_counter()
        with PeakMem(dev) as pm:  # a replay allocates nothing: the step's memory is taken here, at capture
            step = GraphedWriteStep(fast_m, fp, fast_opt, B, L)
        extra["capture_s"] = time.perf_counter() - t
        extra["capture_peak_mb"] = pm.peak_bytes / 2 ** 20
        fast = lambda: step(ids, att)  # noqa: E731
    n_real = int(att.sum())
    trainable = sum(p.numel() for p in fp)
    flops = n_real * (4 * n_params + 6 * trainable)
    with step_cache():  # as the trainer's write loop holds it for its steps
        cpu = dev.type == "cpu"
        stats = _compare(dev, [Side("plain", plain, n_real, flops, [], bf16=cpu and plain_bf16),
                               Side("c2w", fast, n_real, flops, [], bf16=cpu and bf16)], repeats, peak)
    if graphs:
        stats["c2w"]["peak_mem_mb"] = max(stats["c2w"]["peak_mem_mb"], extra["capture_peak_mb"])
    return _result(stats, batch=B, seq=L, real_tokens=n_real, loss_plain=l_plain, loss_c2w=l_fast,
                   loss_abs_diff=abs(l_plain - l_fast), grad_max_rel_diff=gdiff, cuda_graph=graphs, **extra)


def _plain_amp(dev: torch.device, plain_bf16: bool, otherwise=None):
    """The context the plain side runs under: with --plain-bf16 on the CPU, bf16 autocast; else
    `otherwise` (default: none)."""
    if plain_bf16 and dev.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return otherwise if otherwise is not None else contextlib.nullcontext()


def bench_scoring(base, tok, dev, n: int, repeats: int, peak, n_params: int, chat: bool, lora_kw,
                  dtype: torch.dtype | None = None, plain_bf16: bool = False) -> dict:
    from c2w.fast import decode, llama

    plain_m, fast_m = _models(base, lora_kw)
    for m in (plain_m, fast_m):  # an adapter that has been written, so LoRA is not a no-op
        m.eval()
        torch.manual_seed(1)
        for name, p in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    rng = random.Random(0)
    prompts = _texts(tok, rng, 12, 30, n)
    if chat:
        prompts = [f"{SYSTEM}\nQuestion: {p}\nAnswer:" for p in prompts]
    answers = _texts(tok, rng, 1, 4, n)
    n_ans = [len(tok(" " + a, add_special_tokens=False).input_ids) for a in answers]
    mx = [k + 4 for k in n_ans]
    res = {}

    def plain():
        with _plain_amp(dev, plain_bf16):
            res["plain"] = (decode.greedy_decode(plain_m, tok, prompts, mx, batch_size=32, fast=False),
                            decode.answer_logprobs(plain_m, tok, prompts, answers, batch_size=32, fast=False))

    def fast():
        res["c2w"] = decode.decode_and_logprobs(fast_m, tok, prompts, answers, mx, batch_size=32, dtype=dtype)

    n_prompt = sum(len(tok(p, add_special_tokens=False).input_ids) for p in prompts)
    toks = n_prompt + sum(mx)  # prompt tokens read + tokens decoded (upper bound, EOS may cut)
    flops = 2 * n_params * (toks + sum(n_ans))  # the task's own work: each prompt, answer and new token once
    cpu = dev.type == "cpu"
    # a cast plan's weights stay in memory kept between calls (llama.kept_plan): freed first, so that the
    # warm-up's peak counts them, and reported
    llama.release_kept()
    with llama.keep_packed():  # as the evaluator holds it through a run: fp32 frozen weights packed once
        stats = _compare(dev, [Side("plain", plain, toks, flops, [], bf16=cpu and plain_bf16),
                               Side("c2w", fast, toks, flops, [], bf16=cpu and dtype == torch.bfloat16)], repeats, peak)
        stats["c2w"]["kept_mb"] = (llama.kept_bytes() + llama.kept_pack_bytes()) / 2 ** 20
    llama.release_kept()
    (gp, lp), (gc, lc) = res["plain"], res["c2w"]
    same = sum(a == b for x, y in zip(gp, gc) for a, b in zip(x, y)) / max(1, sum(len(x) for x in gp))
    return _result(stats, prompts=n, prompt_tokens=n_prompt, logprob_max_abs_diff=max(abs(a - b) for a, b in zip(lp, lc)),
                   greedy_rows_identical=sum(a == b for a, b in zip(gp, gc)) / n, greedy_tokens_identical=same)


def bench_decode(base, tok, dev, batches: list[int], new: int, repeats: int, peak, n_params: int, lora_kw,
                 plain_bf16: bool = False) -> dict:
    from c2w.fast import decode, llama

    plain_m, fast_m = _models(base, lora_kw)
    for m in (plain_m, fast_m):
        m.eval()
    out = {}
    for B in batches:
        prompts = _texts(tok, random.Random(B), 12, 30, B)
        mx = [new] * B
        res = {}

        def plain():
            with _plain_amp(dev, plain_bf16):
                res["plain"] = decode.greedy_decode(plain_m, tok, prompts, mx, batch_size=B, fast=False)

        def fast():
            res["c2w"] = decode.greedy_decode(fast_m, tok, prompts, mx, batch_size=B)

        flops = 2 * n_params * (B * new + sum(len(tok(p, add_special_tokens=False).input_ids) for p in prompts))
        g0 = dict(decode.GRAPH_STATS)
        with llama.keep_packed():
            stats = _compare(dev, [Side("plain", plain, B * new, flops, [], bf16=dev.type == "cpu" and plain_bf16),
                                   Side("c2w", fast, B * new, flops, [])], repeats, peak)
            stats["c2w"]["kept_mb"] = llama.kept_pack_bytes() / 2 ** 20
        # with --cuda-graphs: the warm-up call captures, the timed (and any --profile) calls reuse it
        graphs = {f"graph_{k}": v - g0[k] for k, v in decode.GRAPH_STATS.items()} if decode.CUDA_GRAPHS else {}
        out[str(B)] = _result(stats, batch=B, new_tokens=new, **graphs,
                              greedy_rows_identical=sum(a == b for a, b in zip(res["plain"], res["c2w"])) / B)
    first = out[str(batches[0])]
    return dict(plain=first["plain"], c2w=first["c2w"], ratio=first["ratio"], batch=batches[0], by_batch=out)


# ---------------------------------------------------------------------------------------------
# the command


def load_model(shape: str, real_weights: bool, dev: torch.device, dtype: torch.dtype, tokenizer=None):
    from transformers import LlamaForCausalLM

    from c2w.backbone import load_backbone, load_tokenizer, tiny_config

    if real_weights:
        bb = load_backbone("smollm2", device=str(dev), dtype=dtype)
        return bb.model, bb.tokenizer
    tok = tokenizer or load_tokenizer("tiny")
    torch.manual_seed(0)
    kw = dict(SMOLLM2_SHAPE) if shape == "smollm2" else dict(TINY_SHAPE, vocab_size=len(tok))
    model = LlamaForCausalLM(tiny_config(**kw)).to(device=dev, dtype=dtype).eval().requires_grad_(False)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def run_perf(device: str = "cpu", batch: int | None = None, seq: int | None = None, repeats: int = 3,
             real_weights: bool = False, compile: bool = False, shape: str = "smollm2",
             workloads: tuple[str, ...] | list[str] = WORKLOADS, scoring_prompts: int = 32, decode_tokens: int = 32,
             decode_batches: tuple[int, ...] = (1, 32), threads: int | None = None, log=None,
             tokenizer=None, cuda_graphs: bool = False, bf16_writes: bool = False, bf16_scoring: bool = False,
             plain_bf16: bool = False, profile: int = 0) -> dict:
    """Run the workloads; returns {workload: {plain, c2w (tokens/s), ratio, detail, ...}, 'setup': ...}.
    `tokenizer`: reuse one already loaded (random-init shapes only). `profile`: steps per path run
    under torch.profiler after the timed rounds (detail[path]['profile'], c2w.perf_profile)."""
    global PROFILE_STEPS
    from c2w.backbone import default_dtype, resolve_device
    from c2w.fast import decode, llama

    if profile < 0:
        raise ValueError(f"profile must be 0 (off) or a number of steps, got {profile}")

    dev = resolve_device(device)
    dtype = default_dtype(dev)
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    say = log or (lambda *_: None)
    t0 = time.perf_counter()
    model, tok = load_model(shape, real_weights, dev, dtype, tokenizer)
    load_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    B = batch or (32 if dev.type == "cuda" else 8)
    L = seq or (128 if dev.type == "cuda" else 64)
    lora_kw = dict(r=16, lora_alpha=32, target_modules="all-linear")
    n_gemm = None if shape == "smollm2" else 256
    # re-measured every round; bf16=True: the bf16 GEMM, for a CPU side whose matmuls run in bf16
    peak = lambda bf16=False: matmul_peak(dev, torch.bfloat16 if bf16 else dtype, n_gemm, rounds=2)  # noqa: E731
    llama.COMPILE = bool(compile)
    decode.CUDA_GRAPHS = bool(cuda_graphs) and dev.type == "cuda"
    out: dict = dict(setup=dict(device=str(dev), device_name=_device_name(dev), dtype=str(dtype).replace("torch.", ""),
                                model="SmolLM2-135M" + (" (real weights)" if real_weights else " shape, random init")
                                if shape == "smollm2" else "tiny", params=n_params, lora=lora_kw, repeats=repeats,
                                threads=torch.get_num_threads(), torch=torch.__version__, compile=bool(compile),
                                cuda_graphs=decode.CUDA_GRAPHS, graph_tokens=decode.GRAPH_TOKENS if decode.CUDA_GRAPHS else None,
                                bf16_writes=bool(bf16_writes) and dev.type == "cpu",
                                bf16_scoring=bool(bf16_scoring) and dev.type == "cpu",
                                plain_bf16=bool(plain_bf16) and dev.type == "cpu", profile_steps=profile,
                                matmul_peak_gflops=matmul_peak(dev, dtype, n_gemm) / 1e9, load_s=load_s))
    if dev.type == "cpu" and (bf16_writes or bf16_scoring or plain_bf16):
        out["setup"]["matmul_peak_bf16_gflops"] = matmul_peak(dev, torch.bfloat16, n_gemm) / 1e9
    try:
        PROFILE_STEPS = profile
        for w in workloads:
            t = time.perf_counter()
            say(f"perf: {w} ...")
            if w in ("write", "write_var"):
                out[w] = bench_write(model, tok, dev, B, L, repeats, peak, n_params, w == "write_var", lora_kw,
                                     graphs=decode.CUDA_GRAPHS, bf16=bf16_writes, plain_bf16=plain_bf16)
            elif w in ("scoring", "scoring_chat"):
                out[w] = bench_scoring(model, tok, dev, scoring_prompts, repeats, peak, n_params, w == "scoring_chat", lora_kw,
                                       torch.bfloat16 if bf16_scoring and dev.type == "cpu" else None, plain_bf16)
            elif w == "decode":
                out[w] = bench_decode(model, tok, dev, list(decode_batches), decode_tokens, repeats, peak, n_params, lora_kw,
                                      plain_bf16)
            else:
                raise ValueError(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
            out[w]["wall_s"] = time.perf_counter() - t
    finally:
        llama.COMPILE = False
        decode.CUDA_GRAPHS = False
        decode.clear_graphs()
        PROFILE_STEPS = 0
        torch.set_num_threads(threads_before)
    return out


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "cpu")
        return f"{name} x{os.cpu_count()}"
    except OSError:
        return "cpu"


def format_table(res: dict) -> str:
    s = res["setup"]
    lines = [f"c2w perf on {s['device_name']} ({s['device']}, {s['dtype']}, {s['threads']} threads), {s['model']}, "
             f"LoRA r={s['lora']['r']} all-linear; medians of {s['repeats']}; MFU against the square GEMM "
             f"measured in each round (at start: {s['matmul_peak_gflops']:.0f} GFLOP/s"
             + (f"; bf16 {s['matmul_peak_bf16_gflops']:.0f}, for the paths that run in bf16" if "matmul_peak_bf16_gflops" in s else "")
             + ")"
             + ("; c2w's write steps under bf16 autocast (--bf16-writes)" if s.get("bf16_writes") else "")
             + ("; c2w's scoring blocks in bf16 (--bf16-scoring)" if s.get("bf16_scoring") else "")
             + ("; plain under bf16 autocast (--plain-bf16)" if s.get("plain_bf16")
                else "; plain in fp32" if s.get("bf16_writes") or s.get("bf16_scoring") else ""),
             f"{'workload':<16}{'path':<7}{'tokens/s':>11}{'ms/step':>11}{'MFU':>8}{'peak MB':>10}{'c2w/plain':>11}"
             "  (range over rounds)"]
    for w, r in res.items():
        if w == "setup":
            continue
        rows = r["by_batch"].items() if "by_batch" in r else [("", r)]
        for tag, rr in rows:
            name = f"{w}{' b' + tag if tag else ''}"
            for path in ("plain", "c2w"):
                d = rr["detail"][path]
                ratio = f"{rr['ratio']:.2f}x" if path == "c2w" else ""
                rounds = rr.get("ratio_rounds") or []
                spread = f"  ({min(rounds):.2f}-{max(rounds):.2f})" if path == "c2w" and len(rounds) > 1 else ""
                lines.append(f"{name if path == 'plain' else '':<16}{path:<7}{d['tokens_per_s']:>11.1f}"
                             f"{d['ms_per_step']:>11.1f}{100 * d['mfu']:>7.1f}%{d['peak_mem_mb']:>10.0f}{ratio:>11}{spread}")
        agree = {k: v for k, v in r.items() if "diff" in k or "identical" in k}
        if agree:
            lines.append(" " * 16 + "agreement: " + ", ".join(f"{k}={v:.3g}" for k, v in agree.items()))
        kept = r.get("detail", {}).get("c2w", {}).get("kept_mb")
        if kept:
            lines.append(" " * 16 + f"c2w keeps {kept:.0f} MB between calls (its cast weights' memory, or its frozen "
                                    "weights packed; built in the warm-up, within its peak)")
        for tag, rr in rows:
            for path in ("plain", "c2w"):
                if "profile" in rr["detail"][path]:
                    head, *rest = format_profile(rr["detail"][path]["profile"])
                    lines.append(f"{'':<16}profile {w}{' b' + tag if tag else ''} {path}: {head}")
                    lines += [" " * 18 + x for x in rest]
    return "\n".join(lines)


def cmd_perf(ns) -> int:
    import sys

    res = run_perf(device=ns.device, batch=ns.batch, seq=ns.seq, repeats=ns.repeats, real_weights=ns.real_weights,
                   compile=ns.compile, shape=ns.shape, threads=ns.threads,
                   cuda_graphs=ns.cuda_graphs, bf16_writes=ns.bf16_writes, bf16_scoring=ns.bf16_scoring,
                   plain_bf16=ns.plain_bf16, profile=ns.profile, workloads=[w for w in ns.workloads.split(",") if w],
                   log=None if ns.json else (lambda m: print(m, file=sys.stderr)))
    print(json.dumps(res, indent=1) if ns.json else format_table(res))
    return 0


if __name__ == "__main__":  # python -m c2w.perf [flags]
    import argparse

    ap = argparse.ArgumentParser(prog="c2w")
    add_perf_parser(ap.add_subparsers(dest="command", required=True))
    ns = ap.parse_args(["perf", *__import__("sys").argv[1:]])
    raise SystemExit(ns.func(ns))
