"""`c2w perf --profile`: where one step's time goes, per path, by kind of work.

After the timed rounds, each path's step runs `steps` more times under `torch.profiler`. Time is
counted where it is spent: on the CPU, each operator's self time (its own work, children excluded,
so the rows add up without double counting); on CUDA, each kernel's device time. Kernels are used
there because a replayed CUDA graph shows no operators at all, only its kernels. Each name is put in
one kind by `op_kind` (name patterns, first match wins; the raw top rows are reported beside them).

    wall_ms    one step's wall time under the profiler (the profiler itself adds a little)
    op_ms      the time inside operators (CPU) or kernels (CUDA), per step
    by_kind    op_ms split by kind: matmul, attention, softmax/loss, norm, elementwise,
               copy/cast/index, optimizer, framework (autograd and Python-level records), other
    top        the `top` largest rows: [name, ms per step, calls per step]

On the CPU, wall_ms - op_ms is time outside any operator (Python, the dispatcher between ops).
On CUDA, it is time the GPU sat idle or overlapped, since kernels run asynchronously.
Kinds go by name only: c2w's own cross-entropy (`_LinearCE`, written out op by op) shows as its
matmuls plus elementwise ops (exp_, sub, ...), not as softmax/loss; the top rows show which.
"""

from __future__ import annotations

import re
import time
from typing import Callable

import torch

KINDS: tuple[tuple[str, str], ...] = (
    # kernels and operators, lower-cased; the first pattern that matches names the kind
    ("optimizer", r"adam|multi_tensor|foreach|clip_grad|vector_norm|lpnorm|optimizer"),
    # autograd's own rows (their self time is bookkeeping; the work is in the aten ops they call)
    ("framework", r"^autograd::|backward\d+$|accumulategrad"),
    ("attention", r"scaled_dot_product|flash|fmha|attention|sdpa"),
    ("copy/cast/index", r"^mkldnn::_reorder"),  # a weight's repacking (llama.packed), before matmul's "mkldnn"
    ("matmul", r"^aten::(mm|addmm_?|bmm|baddbmm|matmul|linear|_addmm_activation)$|gemm|gemv|splitk|xmma|nvjet|"
               r"cublas|s16816|h16816|wgmma|mkldnn|onednn"),
    ("softmax/loss", r"softmax|logsumexp|nll|cross_entropy"),
    ("norm", r"rms_norm|layer_norm|rsqrt"),
    ("copy/cast/index", r"copy|^aten::to$|clone|contiguous|^aten::(cat|stack)$|cat_|index|gather|scatter|embedding|"
                        r"fill|zero_|masked|^aten::(select|slice|view|reshape|transpose|expand|t|split|chunk|"
                        r"narrow|unsqueeze|squeeze|permute|as_strided|expand_as|empty|empty_like|empty_strided|zeros|ones_like|"
                        r"zeros_like|new_empty|new_zeros|detach|alias|_unsafe_view|unbind|resolve_conj)$|memcpy|memset"),
    ("elementwise", r"mul|add|sub|div|silu|sigmoid|exp|neg|where|pow|sqrt|clamp|abs|threshold|relu|sum|mean|"
                    r"amax|max|min|elementwise|vectorized|reduce"),
)


def op_kind(name: str) -> str:
    """The kind of work a profiler row does, from its operator or kernel name."""
    n = name.lower()
    for kind, pat in KINDS:
        if re.search(pat, n):
            return kind
    return "other" if n.startswith("aten::") or "kernel" in n else "framework"


def _rows(prof, cuda: bool) -> list[tuple[str, float, int]]:
    """(name, self time in us, calls) per distinct name: CUDA kernels (and copies) or CPU operators."""
    rows = []
    for e in prof.key_averages():
        if cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = getattr(e, "self_device_time_total", None)
            us = e.self_cuda_time_total if us is None else us
        else:
            if e.device_type != torch.autograd.DeviceType.CPU:
                continue
            us = e.self_cpu_time_total
        if us > 0:
            rows.append((e.key, float(us), int(e.count)))
    return rows


def profile_step(fn: Callable[[], object], dev: torch.device, steps: int = 2, top: int = 8) -> dict:
    """Run fn() `steps` times under torch.profiler; the time per step by kind of work (module doc)."""
    from torch.profiler import ProfilerActivity, profile

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        if cuda:
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize(dev)
        wall = time.perf_counter() - t
    rows = _rows(prof, cuda)
    by_kind: dict[str, float] = {}
    for name, us, _ in rows:
        k = op_kind(name)
        by_kind[k] = by_kind.get(k, 0.0) + us / 1e3 / steps
    rows.sort(key=lambda r: -r[1])
    return dict(device=dev.type, steps=steps, wall_ms=1e3 * wall / steps, op_ms=sum(by_kind.values()),
                by_kind=dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
                top=[[name, us / 1e3 / steps, count / steps] for name, us, count in rows[:top]])


def format_profile(prof: dict, width: int = 60) -> list[str]:
    """Two lines: the split by kind (share of op time), then the largest rows."""
    op = prof["op_ms"] or 1.0
    where = "kernels" if prof.get("device") == "cuda" else "ops"
    kinds = ", ".join(f"{k} {100 * v / op:.0f}%" for k, v in prof["by_kind"].items() if v / op >= 0.01)
    tops = "; ".join(f"{n[:width]} {ms:.1f} ms x{c:g}" for n, ms, c in prof["top"][:4])
    return [f"{prof['op_ms']:.1f} ms/step in {where} of {prof['wall_ms']:.1f} wall: {kinds}", f"top: {tops}"]
