"""Run one learner through one stream and measure everything after every episode."""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass

import numpy as np

from c2w.evaluation import metrics as M
from c2w.evaluation.drift import drift, drift_rows, summarise_drift
from c2w.evaluation.memory import PeakMemory
from c2w.evaluation.probeset import ProbeSet
from c2w.evaluation.scoring import format_prompts, score_probes
from c2w.fast import llama
from c2w.learners.base import Learner
from c2w.streams.records import Stream


@dataclass
class Snapshot:
    """Per-item scores of one evaluation (aligned with ProbeSet.items)."""

    correct: np.ndarray
    strict: np.ndarray
    logprob: np.ndarray
    seconds: float
    routed: np.ndarray | None = None  # per item, through the learned weights (True) or the base; None: not routed


@dataclass
class EvalContext:
    """Everything the runner needs that does not change across methods within a seed."""

    stream: Stream
    probes: ProbeSet
    probe_format: str
    passages: list  # encoded general-text passages
    base_lp: list  # base log-probs on them
    batch_size: int = 32
    known_to_base: frozenset = frozenset()  # ids of `known` records whose probe the frozen base answers


def evaluate(model, tokenizer, ctx: EvalContext, learner: Learner | None = None, subset: list[int] | None = None,
             with_logprob: bool = True) -> Snapshot:
    idx = list(range(len(ctx.probes.items))) if subset is None else subset
    prompts = [ctx.probes.items[k].probe.prompt for k in idx]
    if learner is not None:
        prompts = learner.contextualize(prompts)
    t0 = time.perf_counter()
    on = learner.route(prompts) if learner is not None else None  # routed on the question, not its template
    prompts = format_prompts(tokenizer, prompts, ctx.probe_format)
    answers = [ctx.probes.items[k].probe.answer for k in idx]
    was_training = model.training
    model.eval()
    scores = score_routed(model, tokenizer, prompts, answers, on, batch_size=ctx.batch_size, with_logprob=with_logprob)
    model.train(was_training)
    return Snapshot(np.array([s.correct for s in scores], bool), np.array([s.strict for s in scores], bool),
                    np.array([s.logprob for s in scores], float), time.perf_counter() - t0,
                    None if on is None else np.array(on, bool))


def score_routed(model, tokenizer, prompts: list[str], answers: list[str], on: list[bool] | None, **kw) -> list:
    """score_probes, with the rows routed off scored on the frozen base (PEFT's disable_adapter)."""
    if on is None or all(on):
        return score_probes(model, tokenizer, prompts, answers, **kw)
    out: list = [None] * len(prompts)
    for flag in (True, False):
        idx = [i for i, o in enumerate(on) if o == flag]
        if not idx:
            continue
        with contextlib.nullcontext() if flag else model.disable_adapter():
            for i, s in zip(idx, score_probes(model, tokenizer, [prompts[i] for i in idx], [answers[i] for i in idx], **kw)):
                out[i] = s
    return out


def _by_episode(values: np.ndarray, ps: ProbeSet) -> np.ndarray:
    """Mean of `values` over each episode's matrix items -> [T] (nan where an episode has none)."""
    out = np.full(ps.n_episodes, np.nan)
    for j in range(ps.n_episodes):
        k = ps.of("matrix", j)
        if k:
            out[j] = float(np.mean(values[k]))
    return out


def run_learner(learner: Learner, ctx: EvalContext, base: Snapshot, progress_bar=None, setup_s: float = 0.0) -> dict:
    """Observe each episode, evaluate all probes after it; return this run's metrics dict.
    setup_s: seconds the learner took to build (c2w samples its rehearsal set there); wall_s includes it."""
    # frozen fp32 CPU weights stay packed through the run (llama.keep_packed): scoring calls pack nothing.
    # They are the evaluator's, not the learner's: packed before the memory baseline, reported apart
    with llama.keep_packed():
        packs = 0 if learner.static else llama.warm_packs(learner.model)
        with PeakMemory(learner.backbone.device) as mem:
            out = _run(learner, ctx, base, progress_bar)
    out["cost"]["peak_mem_mb"] = mem.peak_mb
    out["cost"]["eval_packed_mb"] = packs / 2 ** 20
    out["cost"]["setup_s"] = setup_s
    out["cost"]["wall_s"] += setup_s
    return out


def _run(learner: Learner, ctx: EvalContext, base: Snapshot, progress_bar=None) -> dict:
    ps, tok = ctx.probes, learner.tokenizer
    snaps: list[Snapshot] = []
    curves: list[list[float]] = []  # per episode: current-episode accuracy at budget fractions
    wall0 = time.perf_counter()
    for i in range(ps.n_episodes):
        cur = ps.of("matrix", i)
        prev = snaps[-1] if snaps else base
        curve = [float(prev.correct[cur].mean()) if cur else np.nan]

        # progress points at fractions of the episode's budget, in the write or in what ends the episode
        for _step, _tokens in itertools.chain(learner.observe_steps(i, ctx.stream.observations(i)),
                                              learner.end_episode_steps(i)):
            if cur:  # the write is paused here; measure the current episode, then resume it
                curve.append(float(evaluate(learner.model, tok, ctx, learner, cur, with_logprob=False).correct.mean()))
        snaps.append(base if learner.static else evaluate(learner.model, tok, ctx, learner))
        curve.append(float(snaps[-1].correct[cur].mean()) if cur else np.nan)
        curves.append(curve)
        if progress_bar is not None:
            progress_bar.update(1)
    wall = time.perf_counter() - wall0
    return summarise(learner, ctx, base, snaps, curves, wall)


def summarise(learner: Learner, ctx: EvalContext, base: Snapshot, snaps: list[Snapshot], curves, wall: float) -> dict:
    ps = ctx.probes
    R = np.stack([_by_episode(s.correct.astype(float), ps) for s in snaps])
    b = _by_episode(base.correct.astype(float), ps)
    Rs = np.stack([_by_episode(s.strict.astype(float), ps) for s in snaps])
    Rlp = np.stack([_by_episode(s.logprob, ps) for s in snaps])
    matrix_items = ps.of("matrix")
    correct = np.stack([s.correct[matrix_items] for s in snaps])
    learned_at = np.array([ps.items[k].episode for k in matrix_items])
    final = snaps[-1]

    # Updates: the new record's probes (matrix items) vs the old answers it retired (stale items).
    new_ok, stale = [], []
    for n, o in ps.update_items():
        if n and o:
            new_ok.append(float(final.correct[n].mean()))
            stale.append(float(final.correct[o].mean()))
    ctrl = ps.of("control")
    control_acc = float(final.correct[ctrl].mean()) if ctrl else np.nan
    control_base = float(base.correct[ctrl].mean()) if ctrl else np.nan
    locality = {"control_acc": control_acc,
                "control_rel": control_acc / control_base if ctrl and control_base > 0 else np.nan}
    if not ctx.passages:
        locality.update({"kl": np.nan, "ppl_ratio": np.nan})
    elif not learner.writes_weights:  # the base's own weights: no drift by construction (scoring them
        locality.update({"kl": 0.0, "ppl_ratio": 1.0})  # would only measure the bf16 rounding of base_lp)
    else:
        text_on = learner.route([learner.tokenizer.decode(p) for p in ctx.passages])
        if text_on is None:
            locality.update(drift(learner.model, ctx.passages, ctx.base_lp))
        else:  # every passage once through the weights: routed, and what the weights alone would do
            rows = drift_rows(learner.model, ctx.passages, ctx.base_lp)
            locality.update(summarise_drift(rows, text_on))
            locality["kl_unrouted"] = summarise_drift(rows)["kl"]
        if text_on is not None:
            locality["routed_text"] = float(np.mean(text_on)) if text_on else np.nan
    if final.routed is not None:  # share of each kind of probe the router sent through the adapters
        for kind in ("matrix", "stale", "control"):
            k = ps.of(kind)
            locality[f"routed_{kind}"] = float(final.routed[k].mean()) if k else np.nan
        # The same weights with the router off (adapters on for every input), at the end only: the
        # router's own contribution, without a second run (routing changes no training).
        off = evaluate(learner.model, learner.tokenizer, ctx, None, with_logprob=False)
        locality["control_acc_unrouted"] = float(off.correct[ctrl].mean()) if ctrl else np.nan
        locality["acc_unrouted"] = float(np.nanmean(_by_episode(off.correct.astype(float), ps)))

    # Learning speed: each episode's curve sampled at equal budget fractions; mean over episodes.
    width = max(len(c) for c in curves)
    grid = np.array([c if len(c) == width else [c[0]] * (width - 1) + [c[-1]] for c in curves], float)
    mean_curve = np.nanmean(grid, axis=0) if np.isfinite(grid).any() else grid[0]
    fractions = np.linspace(0, 1, width)

    role_of = {r.id: r.role for r in ctx.stream.records}
    gate = {}
    for role in ("learn", "noise", "known", "duplicate"):
        ids = [i for i, r in role_of.items() if r == role]
        gate[f"written_{role}"] = (sum(i in learner.written_ids for i in ids) / len(ids)) if ids else np.nan
    known = [r.id for r in ctx.stream.records if r.role == "known" and r.probes]  # those that can be checked
    really = [i for i in known if i in ctx.known_to_base]
    gate["known_to_base"] = len(really) / len(known) if known else np.nan  # share the base really answers
    gate["written_known_to_base"] = sum(i in learner.written_ids for i in really) / len(really) if really else np.nan
    # The gate's per-record signals and decisions (c2w only), with what the gate never saw: the
    # record's role, and for `known` records whether the base answers them.
    gate_log = [{**g, "role": role_of.get(g["id"]),
                 **({"base_answers": g["id"] in ctx.known_to_base} if role_of.get(g["id"]) == "known" else {})}
                for g in getattr(learner, "gate_log", [])]
    n_written = max(1, len(learner.written_ids))
    c = learner.cost
    out = {
        "group": learner.group,
        "accuracy_matrix": R.tolist(),
        "base_accuracy": b.tolist(),
        **M.cl_metrics(R, b),
        "strict": {"acc": float(np.nanmean(Rs[-1])), "learning_accuracy": float(np.nanmean(np.diag(Rs)))},
        "logprob": {"final_mean": float(np.nanmean(Rlp[-1])), "matrix": Rlp.tolist()},
        "flips": M.flip_counts(correct, learned_at),
        "updates": {**M.update_metrics(np.array(new_ok), np.array(stale))},
        "locality": locality,
        "learning_speed": {"auc": M.learning_curve_auc(fractions.tolist(), mean_curve.tolist()),
                           "steps": fractions.tolist(), "acc": mean_curve.tolist()},
        "gate": gate,
        **({"gate_log": gate_log} if gate_log else {}),
        "cost": {"trained_tokens": c.trained_tokens, "train_steps": c.train_steps, "flops": c.flops,
                 "write_flops": c.write_flops, "flops_by": dict(c.flops_by),
                 "train_s": c.train_s, "wall_s": wall, "trainable_params": c.trainable_params,
                 "state_bytes_per_record": learner.state_bytes() / n_written,
                 "probe_latency_ratio": final.seconds / max(base.seconds, 1e-9)},
    }
    return out
