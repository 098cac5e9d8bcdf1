"""`c2w bench`: the recipe that runs every method through the same streams and writes the report.

Linear on purpose: resolve config -> validate streams (before any model loads) -> load backbone ->
filter controls by what the base really knows -> per seed: base evaluation, then each method ->
aggregate -> results.json + report.md + plots.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from c2w.backbone import Backbone, load_backbone
from c2w.config import DEFAULT_LR, LR_GRID, PRESETS, BenchConfig, lr_key  # noqa: F401  (re-exported)
from c2w.evaluation.drift import base_logprobs, encode_passages
from c2w.evaluation.probeset import build_probeset
from c2w.evaluation.runner import EvalContext, evaluate, run_learner
from c2w.evaluation.scoring import normalise
from c2w.learners import LearnerConfig, make_learner
from c2w.learners.train import thin_budget
from c2w.streams.controls import add_controls, control_candidates
from c2w.streams.fictional import FictionalConfig, generate_fictional
from c2w.streams.general_text import general_text
from c2w.streams.records import Record, Stream
from c2w.streams.validate import load_stream

def build_stream(cfg: BenchConfig, seed: int) -> Stream:
    if cfg.stream == "fictional":
        return generate_fictional(FictionalConfig(
            episodes=cfg.episodes, facts_per_episode=cfg.facts_per_episode, update_fraction=cfg.update_fraction,
            noise_per_episode=cfg.stress, duplicates_per_episode=cfg.stress, known_per_episode=cfg.stress, seed=seed))
    return load_stream(cfg.stream)  # raises StreamError listing every problem


def base_answers(bb: Backbone, records: list[Record], probe_format: str) -> set[str]:
    """Ids of the records of which the frozen base answers at least one probe (greedy, scored as
    every probe is)."""
    cands = [r if r.role == "control" else dataclasses.replace(r, role="control") for r in records]
    probes = build_probeset(Stream(cands))
    ctx = EvalContext(Stream(cands), probes, probe_format, [], [])
    snap = evaluate(bb.model, bb.tokenizer, ctx, with_logprob=False)
    return {probes.items[k].record_id for k in np.flatnonzero(snap.correct)}


def known_controls(bb: Backbone, n: int, probe_format: str) -> list[Record]:
    """Built-in control facts, kept only where the base answers correctly: locality then measures
    what the model really knew, not noise around chance."""
    if n <= 0:
        return []
    cands = control_candidates(4 * n, seed=0)
    ok = base_answers(bb, cands, probe_format)
    return [r for r in cands if r.id in ok][:n]


def prepare(cfg: BenchConfig) -> tuple[Backbone, list[Record], list, list]:
    """What every run over a resolved config shares: the backbone, the control facts it knows,
    the held-out passages and the base's log-probs on them."""
    bb = load_backbone(cfg.model, cfg.device)
    controls = known_controls(bb, cfg.controls, cfg.probe_format)
    passages = encode_passages(bb.tokenizer, general_text(cfg.general_texts)) if cfg.general_texts else []
    return bb, controls, passages, base_logprobs(bb.model, passages)


def unscorable(stream: Stream) -> list[str]:
    """Probe answers that normalise to nothing ("%", "+"): no continuation can ever contain them."""
    return [p.answer for r in stream.records for p in r.probes if not normalise(p.answer)]


def _some(items, k: int = 3) -> str:
    """The first k items, comma-joined, with ", ..." when there are more."""
    items = list(items)
    return ", ".join(items[:k]) + (", ..." if len(items) > k else "")


def unscored(stream: Stream) -> list[str]:
    """What the stream asks that no metric will count, or counts in a way worth knowing: updates whose
    replacing record has no probes of its own (or is not a learn record) or changes no old answer
    (an update replaced in turn is measured through the later one: not named), old probes a record
    leaves in the matrix though its text no longer states their answer, and probes on noise or
    duplicate records."""
    ps, out = build_probeset(stream), []
    replaced_later = {it.record_id for it in ps.items if it.kind == "stale"}
    if lost := [f"{new} (replaces {old})" for (new, old), (n, o) in zip(ps.updates, ps.update_items())
                if not (n and o) and new not in replaced_later]:
        out.append(f"{len(lost)} update(s) are left out of updates.* ({_some(lost)}): "
                   f"the replacing record has no probes of its own, is not a learn record, or changes no old answer")
    by_id = {r.id: r for r in stream.records}
    kept = [f"{by_id[rid].probes[k].answer!r} of {rid} (by {by})" for rid, k, by in ps.unstated]
    if kept:
        out.append(f"{len(kept)} old answer(s) stay in the matrix though the record replacing theirs no longer states them "
                   f"({_some(kept)}): it asks other old prompts again, so it is "
                   f"read as a partial update; if these facts changed too, ask their prompts in the replacing record")
    if n := sum(len(r.probes) for r in stream.records if r.role in ("noise", "duplicate")):
        out.append(f"{n} probe(s) on noise or duplicate records are not scored (learn and control records' probes are; known "
                   f"records' tell whether the base knows the fact)")
    return out


def observed_lengths(tokenizer, stream: Stream) -> list[tuple[int, int]]:
    """(episode, tokens) of each text a learner observes (controls are never observed)."""
    return [(r.episode, len(tokenizer(r.text).input_ids)) for r in stream.records if r.observed and r.text.strip()]


def episode_tokens(tokenizer, stream: Stream, lengths: list[tuple[int, int]] | None = None) -> list[int]:
    """Per episode: the tokens of the text a learner observes (`lengths`: observed_lengths, if at hand)."""
    tokens = [0] * stream.n_episodes
    for ep, n in observed_lengths(tokenizer, stream) if lengths is None else lengths:
        tokens[ep] += n
    return tokens


def learner_config(cfg: BenchConfig, method: str, seed: int, lr: float | None = None) -> LearnerConfig:
    return LearnerConfig(lr=lr or cfg.lr or DEFAULT_LR.get(lr_key(method), 1e-3), token_budget=cfg.token_budget,
                         progress_points=cfg.progress_points, bf16_writes=cfg.bf16_writes, seed=seed)


def run_seed(bb: Backbone, cfg: BenchConfig, stream: Stream, controls: list[Record], passages, base_lp,
             methods: list[str], lrs: dict[str, float], seed: int, bar=None, done=None) -> dict[str, dict]:
    """Every method through one seed's stream; `done(method, result)` is called as each one finishes."""
    if controls and not any(r.role == "control" for r in stream.records):
        stream = add_controls(stream, controls)
    # `known` records are real facts the base *likely* knows; the gate is also judged on those it
    # really answers (a fact the base cannot state is new to it, and writing it is no mistake).
    known = [r for r in stream.records if r.role == "known" and r.probes]
    ctx = EvalContext(stream, build_probeset(stream), cfg.probe_format, passages, base_lp,
                      known_to_base=frozenset(base_answers(bb, known, cfg.probe_format)) if known else frozenset())
    base = evaluate(bb.model, bb.tokenizer, ctx)
    out = {}
    for m in methods:
        if bar is not None:
            bar.set_description(f"seed {seed} {m}")
        t0 = time.perf_counter()
        learner = make_learner(m, bb, learner_config(cfg, m, seed, lrs.get(m)))
        out[m] = run_learner(learner, ctx, base, bar, setup_s=time.perf_counter() - t0)
        del learner
        if done is not None:
            done(m, out[m])
    return out


def choose_lrs(bb, cfg, controls, passages, base_lp) -> dict[str, dict]:
    """Grid-search each weight-writing method's lr on the validation seed by final ACC (the c2w
    ablations take c2w's choice)."""
    stream = build_stream(cfg, cfg.validation_seed)
    choice = {}
    for m in dict.fromkeys(lr_key(m) for m in cfg.methods):
        if m not in LR_GRID:
            continue
        scores, seen = {}, {}
        for lr in tqdm(LR_GRID[m], desc=f"lr grid {m}", leave=False):
            res = run_seed(bb, cfg, stream, controls, passages, base_lp, [m], {m: lr}, cfg.validation_seed)[m]
            scores[lr] = res["acc"]
            seen[lr] = {"learning_accuracy": res["learning_accuracy"], "bwt": res["bwt"],
                        "forgetting": res["forgetting"], "control_acc": res["locality"]["control_acc"]}
        choice[m] = {"lr": max(scores, key=lambda k: scores[k]), "acc_by_lr": scores, "other_by_lr": seen}
    return choice


def provenance(bb: Backbone) -> dict:
    import peft
    import transformers

    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
        except OSError:
            return ""

    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_revision": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
            "versions": {"c2w": __import__("c2w").__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__,
                         "python": platform.python_version()},
            "hardware": {"platform": platform.platform(), "processor": platform.processor(),
                         "cpu_threads": torch.get_num_threads(), "device": str(bb.device),
                         "gpu": torch.cuda.get_device_name(bb.device) if bb.device.type == "cuda" else None},
            "model": bb.name, "model_params": bb.n_params}


def bench(cfg: BenchConfig) -> dict:
    from c2w.report import aggregate_runs, jsonable, write_report

    cfg = cfg.resolved()
    t0 = time.perf_counter()
    seeds = cfg.reported_seeds()
    streams = {s: build_stream(cfg, s) for s in seeds}  # validates before any model is loaded
    out = Path(cfg.out or f"runs/bench-{_dt.datetime.now():%Y%m%d-%H%M%S}")
    partial = out / "partial.json"
    for held in (out / "results.json", partial):  # refused before any model loads: nothing lost
        if held.exists() and not cfg.overwrite:
            raise FileExistsError(f"{out} already holds a{' stopped' if held == partial else ''} run ({held.name}); "
                                  f"choose another --out, or pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    partial.unlink(missing_ok=True)  # --overwrite: an older stopped run's finished runs would sit beside this one
    for line in unscored(streams[seeds[0]]):
        tqdm.write(f"c2w bench: {line}")
    bb, controls, passages, base_lp = prepare(cfg)
    lengths = {s: observed_lengths(bb.tokenizer, st) for s, st in streams.items()}  # one tokenisation pass
    tokens = {s: episode_tokens(bb.tokenizer, st, lengths[s]) for s, st in streams.items()}
    if thin := thin_budget(cfg.token_budget, max(max(t) for t in tokens.values()), "--token-budget"):
        tqdm.write(f"c2w bench, longest episode: {thin}")
    if blank := unscorable(streams[seeds[0]]):
        tqdm.write(f"c2w bench: {len(blank)} probe answer(s) have no letter or digit ({_some(map(repr, blank), 5)}); "
                   f"scoring compares words, so they can never be scored correct")
    cut = LearnerConfig.max_len
    over = {s: sum(n > cut for _, n in ls) for s, ls in lengths.items()}  # a write step keeps a text's first `cut`
    if any(over.values()):
        tqdm.write(f"c2w bench: {max(over.values())} observed text(s) are longer than {cut} tokens (LearnerConfig.max_len, "
                   f"what one write step keeps of a text); every method that writes weights trains on each as windows "
                   f"of at most {cut} tokens")
    search, skipped = cfg.lr_search and cfg.lr is None, None
    if search and cfg.stream != "fictional":
        # a file is the reported stream itself: a grid on it would choose lrs on what we report
        skipped = ("a stream file has no validation seed; the grid would pick learning rates on the reported "
                   "stream, so each method keeps its default (set one with --lr)")
        tqdm.write(f"c2w bench: --lr-search skipped: {skipped}")
    lr_choice = choose_lrs(bb, cfg, controls, passages, base_lp) if search and not skipped else {}
    lrs = {m: lr_choice[lr_key(m)]["lr"] for m in cfg.methods if lr_key(m) in lr_choice}
    runs: dict[str, list[dict]] = {m: [] for m in cfg.methods}
    used_lrs = {m: lrs.get(m) or cfg.lr or DEFAULT_LR[lr_key(m)] for m in cfg.methods if lr_key(m) in DEFAULT_LR}
    # every finished (seed, method) run is kept in partial.json as it ends, so a crash or Ctrl-C hours
    # in loses only the run under way; the file goes once results.json is written
    finished: list[dict] = []

    def keep(seed: int, m: str, r: dict) -> None:
        now = finished + [{"seed": seed, "method": m, "result": r}]
        tmp = partial.with_suffix(".tmp")
        tmp.write_text(json.dumps(jsonable({"config": dataclasses.asdict(cfg), "learning_rates": used_lrs,
                                            "finished": now}), indent=1))
        tmp.replace(partial)
        finished.append(now[-1])

    try:
        with tqdm(total=len(seeds) * len(cfg.methods) * streams[seeds[0]].n_episodes, desc="bench", unit="episode") as bar:
            for s in seeds:
                for m, r in run_seed(bb, cfg, streams[s], controls, passages, base_lp, cfg.methods, lrs, s, bar,
                                     done=lambda m, r, s=s: keep(s, m, r)).items():
                    runs[m].append(r)
    except BaseException:
        if finished:
            tqdm.write(f"c2w bench: stopped; the {len(finished)} finished run(s) (seed, method, result) are in {partial}")
        raise
    results = {
        "config": {**dataclasses.asdict(cfg), "n_controls_offered": len(controls),
                   "learning_rates": used_lrs,
                   "lr_search": lr_choice, "lr_search_skipped": skipped, "seeds_reported": seeds,
                   "texts_over_max_len": {s: (n, cut) for s, n in over.items()}, "stream_meta": streams[seeds[0]].meta,
                   "stream_sha256": {s: st.fingerprint() for s, st in streams.items()},
                   "probes_per_episode": {s: [len(ps.of("matrix", e)) for e in range(ps.n_episodes)]
                                          for s, ps in ((s, build_probeset(st)) for s, st in streams.items())},
                   "budget_passes": {s: [round(cfg.token_budget / n, 2) if n else None for n in t]
                                     for s, t in tokens.items()}},
        "provenance": {**provenance(bb), "wall_s": time.perf_counter() - t0},
        "methods": {m: aggregate_runs(rs) for m, rs in runs.items()},
    }
    (out / "results.json").write_text(json.dumps(jsonable(results), indent=1))
    partial.unlink(missing_ok=True)
    write_report(results, out)
    return results

