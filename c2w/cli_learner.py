"""`c2w learn | sleep | ask | status --state DIR`: the c2w learner as a tool, outside the benchmark.

    c2w learn --state DIR notes.jsonl        observe the texts as one episode: gate, write (fast adapter)
    echo "Mira Talvik was born in Oskeln." | c2w learn --state DIR -
    c2w sleep --state DIR                    replay (+ rehearsal if on), consolidate fast -> slow
    c2w ask --state DIR "Where was Mira Talvik born?"     greedy answer from the weights (no retrieval)
    c2w status --state DIR [--json]

The first `learn` on a missing or empty DIR creates the state (backbone from --model, config from
the flags in "state settings"); later calls reuse it. Input is checked completely before anything is
loaded or written: on any problem every one is listed and the state is left untouched. Each update
is atomic (see c2w/state.py), so a killed run leaves the last complete state, and the next resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

from c2w.cliargs import add_dataclass_args, overrides

# LearnerConfig fields that only the baselines use: not settings of a c2w state.
_LEARNER_SKIP = ("replay_fraction", "buffer_size", "rag_k", "progress_points")
# C2WConfig.sleep is implied (you run `c2w sleep` or `learn --sleep` when you want one).
_C2W_SKIP = ("sleep",)
_PLACEHOLDER = "\x00line"  # marks records that gave no id; they get e<episode>-<k>, k = 1.. in input order
PROGRESS_POINTS = 20
LEARN_DESCRIPTION = """Observe texts as one episode: the gate picks what is new and learnable, the picked texts
(and their views) are written into the fast adapter, and the state is saved. --sleep then
consolidates; otherwise run `c2w sleep` when you like.

Input: a JSONL file, one object per line with at least "text" ("id" optional; "episode" optional
but a single value, since a call is one episode; "probes", "role", "meta" as in stream files,
control records not observed), or "-" for stdin, where plain-text lines (one text each) are
accepted too. A .txt file is read as plain text. Every problem is listed, with its line and
field, before anything is loaded; the state is then left unchanged.

The first call on a missing or empty --state creates it from --model and the state settings."""


class InputError(ValueError):
    def __init__(self, source: str, issues: list):
        self.source, self.issues = source, issues
        super().__init__(f"{len(issues)} problem(s) in {source}")


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


# --- input --------------------------------------------------------------------------------------
def read_texts(source: str, fmt: str = "auto") -> list[tuple[str | None, str]]:
    """(id or None, text) per observed record of a JSONL file, or of stdin ('-').

    jsonl: one JSON object per line with at least "text" ("id" optional; "episode" optional but one
    value for the whole input, since a call is one episode; "probes", "role", "meta" as in stream
    files; control records are not observed). text: one text per non-empty line. auto: stdin takes
    both, a line that starts with "{" being a record; a file is jsonl, or text if it ends in .txt.
    Raises InputError with every problem (line and field), or FileNotFoundError."""
    from c2w.streams.validate import StreamIssue, validate_lines

    name = "<stdin>" if source == "-" else source
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FileNotFoundError(f"input file not found: {source}") from None
    except OSError as e:
        raise InputError(name, [StreamIssue(0, "", f"cannot read: {e.strerror}")]) from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(name, [StreamIssue(0, "", f"not UTF-8 text: {e}")]) from None
    if fmt == "auto":
        fmt = "mixed" if source == "-" else ("text" if source.endswith(".txt") else "jsonl")

    lines, issues, episodes = [], [], {}
    for n, line in enumerate(content.split("\n"), start=1):  # not splitlines: U+2028 may sit inside JSON
        s = line.strip()
        if not s:
            lines.append("")
            continue
        if fmt == "text" or (fmt == "mixed" and not s.startswith("{")):
            lines.append(json.dumps({"id": f"{_PLACEHOLDER}{n}", "episode": 0, "text": s}))
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError:
            lines.append(line)  # validate_lines reports it
            continue
        if isinstance(obj, dict):
            obj.setdefault("id", f"{_PLACEHOLDER}{n}")
            ep = obj.get("episode", None)
            if isinstance(ep, int) and not isinstance(ep, bool) and ep >= 0:
                episodes.setdefault(ep, n)
                obj["episode"] = 0  # a call is one episode; its number comes from the state
            elif "episode" not in obj:
                obj["episode"] = 0
            line = json.dumps(obj)
        lines.append(line)
    records, found = validate_lines(lines)
    issues += found
    if len(episodes) > 1:
        (e0, n0), (e1, n1) = sorted(episodes.items(), key=lambda kv: kv[1])[:2]
        issues.append(StreamIssue(n1, "episode", f"one `learn` call is one episode, but the input has episode "
                                                 f"{e0} (line {n0}) and {e1}: split it, or drop the field"))
    issues.sort(key=lambda i: (i.line == 0, i.line))
    if issues:
        raise InputError(name, issues)
    return [(None if r.id.startswith(_PLACEHOLDER) else r.id, r.text) for r in records if r.observed]


# --- state settings -----------------------------------------------------------------------------
def _settings(ns) -> tuple[dict, dict, dict]:
    from c2w.config import C2WConfig, GateConfig, LearnerConfig

    return overrides(ns, LearnerConfig), overrides(ns, C2WConfig), overrides(ns, GateConfig)


def check_settings(lc, cc) -> list[str]:
    """Settings that would fail later (after the state exists): refuse them up front."""
    bad = []
    if not lc.lr > 0:
        bad.append(f"--lr must be > 0, got {lc.lr}")
    for k in ("token_budget", "batch_size", "lora_r", "lora_alpha"):
        if getattr(lc, k) < 1:
            bad.append(f"--{k.replace('_', '-')} must be >= 1, got {getattr(lc, k)}")
    if lc.max_len < 8:
        bad.append(f"--max-len must be >= 8, got {lc.max_len}")
    if not 0.0 <= cc.wake_share <= 1.0:
        bad.append(f"--wake-share must be in [0, 1], got {cc.wake_share}")
    if not 0.0 <= cc.min_budget_share <= 1.0:
        bad.append(f"--min-budget-share must be in [0, 1], got {cc.min_budget_share}")
    if not cc.budget_exponent > 0:
        bad.append(f"--budget-exponent must be > 0, got {cc.budget_exponent}")
    if cc.buffer_capacity < 1:
        bad.append(f"--buffer-capacity must be >= 1, got {cc.buffer_capacity}")
    if cc.max_slow_rank < lc.lora_r:
        bad.append(f"--max-slow-rank ({cc.max_slow_rank}) must be >= --lora-r ({lc.lora_r})")
    if cc.rehearsal and not 1 <= cc.rehearsal_batch <= cc.n_rehearsal:
        bad.append(f"rehearsal needs 1 <= --rehearsal-batch ({cc.rehearsal_batch}) <= --n-rehearsal ({cc.n_rehearsal})")
    if cc.router and cc.router_calibration < 3:
        bad.append(f"--router-calibration must be >= 3, got {cc.router_calibration}")
    if cc.router_layer < 1:
        bad.append(f"--router-layer must be >= 1, got {cc.router_layer}")
    return bad


def _check_existing(d: Path, ns, lo: dict, co: dict, go: dict) -> str | None:
    """An existing state keeps its backbone and settings: a flag that disagrees is an error."""
    from c2w.state import read_config, settings

    cfg = read_config(d)
    if ns.model is not None and ns.model != cfg["backbone"]["name"]:
        return (f"state {d} was created with --model {cfg['backbone']['name']}; it cannot switch to "
                f"--model {ns.model} (use a new --state directory)")
    stored = [dataclasses.asdict(c) for c in settings(cfg)]  # what the state runs with, old states included
    for have, given in zip(stored, (lo, co, go)):
        for k, v in given.items():
            if have.get(k) != v:
                return (f"--{k.replace('_', '-')} is fixed when the state is created (state {d} has "
                        f"{have.get(k)!r}); use --budget for this call's tokens, or a new --state")
    return None


def _call_cfg(stored, episode_budget: int | None):
    """The learner's settings for this call: its own budget, and progress points for the bar."""
    return dataclasses.replace(stored, progress_points=PROGRESS_POINTS,
                               **({"token_budget": episode_budget} if episode_budget else {}))


# --- commands -----------------------------------------------------------------------------------
def cmd_learn(ns) -> int:
    from c2w.config import C2WConfig, GateConfig, LearnerConfig
    from c2w.learners.train import thin_budget
    from c2w.state import (StateError, check_dir_usable, gate_counts, init_state, load_state, now, save_state,
                           state_exists, state_lock)

    try:
        texts = read_texts(ns.input, ns.input_format)
    except InputError as e:
        for i in e.issues:
            print(f"{e.source}:{i}", file=sys.stderr)
        print(f"error: {len(e.issues)} problem(s) in {e.source}; nothing was learned and the state is unchanged",
              file=sys.stderr)
        return 2
    if not texts:
        return _err("the input has no text to observe (only control records); the state is unchanged")
    d = Path(ns.state)
    lo, co, go = _settings(ns)
    try:
        if state_exists(d):
            msg = _check_existing(d, ns, lo, co, go)
            if msg:
                return _err(msg)
        else:
            check_dir_usable(d)
            bad = check_settings(LearnerConfig(**lo), C2WConfig(**co))
            if bad:
                return _err("; ".join(bad))
        created = not d.exists()
        with state_lock(d):
            if state_exists(d):
                print(f"loading state {d} ...", file=sys.stderr)
                learner, meta = load_state(d, ns.device)
            else:
                model = ns.model or "smollm2"
                cc = C2WConfig(**co, sleep=True)
                once = [w for w, on in (("the rehearsal set", cc.rehearsal), ("the router's calibration text", cc.router)) if on]
                print(f"creating state {d} on {model}" + (f" (sampling {' and '.join(once)} from the base once)"
                      if once else "") + " ...", file=sys.stderr)
                try:
                    learner, meta = init_state(d, model, LearnerConfig(**lo), cc, GateConfig(**go), ns.device)
                except BaseException:
                    if created and not state_exists(d):
                        shutil.rmtree(d, ignore_errors=True)
                    raise
            stored = learner.cfg
            ep = meta["next_episode"]
            n_before, log_before = len(learner.buffer.entries), len(learner.gate_log)
            tok0, t0 = learner.cost.trained_tokens, time.perf_counter()
            learner.cfg = _call_cfg(stored, ns.budget)
            tokens = sum(len(learner.tokenizer(t).input_ids) for _, t in texts)
            if thin := thin_budget(learner.cfg.token_budget, tokens, "--budget"):
                print(f"c2w learn: {thin}", file=sys.stderr)
            written = _observe(learner, ep, texts)
            learner.cfg = stored
            meta.update(episodes=meta["episodes"] + 1, next_episode=ep + 1, last_learn=now(),
                        texts_observed=meta["texts_observed"] + len(texts),
                        texts_written=meta["texts_written"] + written,
                        writes_since_sleep=meta["writes_since_sleep"] + written)
            version = save_state(learner, d, meta)
            skipped = {r: n for r, n in gate_counts(learner.gate_log[log_before:]).items() if r != "write"}
            print(f"episode {ep}: {written} of {len(texts)} text(s) written"
                  + (f" (not written: {', '.join(f'{n} {r}' for r, n in skipped.items())})" if skipped else "")
                  + f"; trained {learner.cost.trained_tokens - tok0} tokens in {time.perf_counter() - t0:.1f} s;"
                  f" {len(learner.buffer.entries)} entries stored (was {n_before}); saved {d}/{version}")
            if ns.sleep_after:
                _sleep(learner, d, meta, _call_cfg(stored, ns.budget))
    except StateError as e:
        return _err(str(e))
    return 0


def _observe(learner, episode: int, texts: list[tuple[str | None, str]]) -> int:
    """One episode of writes with a progress bar; returns how many texts were written."""
    from tqdm import tqdm

    from c2w.streams.records import Observation

    obs = [Observation(i if i is not None else f"e{episode}-{k}", episode, t) for k, (i, t) in enumerate(texts, 1)]
    n_log = len(learner.gate_log)
    start = learner.cost.trained_tokens
    print(f"gating {len(obs)} text(s) ...", file=sys.stderr)
    bar = None
    try:
        for _, tokens in learner.observe_steps(episode, obs):
            if bar is None:  # the gate has run by now, so the share written and the write's budget are known
                bar = tqdm(total=learner.wake_budget(), unit="tok", desc="write", file=sys.stderr, disable=None, leave=False)
            bar.update(tokens - start - bar.n)
    finally:
        if bar is not None:
            bar.close()
    if learner.c2w.gate:
        return sum(1 for g in learner.gate_log[n_log:] if g.get("write"))
    return len(obs)  # gate off: every (non-empty) text is written


def _sleep(learner, d: Path, meta: dict, call_cfg) -> str:
    """learner.sleep() under call_cfg's budget, then save (with the stored settings)."""
    from c2w.state import adapter_ranks, now, save_state

    stored_cfg, learner.cfg = learner.cfg, call_cfg
    learner.share = 1.0  # an explicit sleep spends the budget it was given, whatever the last gate wrote
    budget = int(learner.cfg.token_budget * (1 - learner.c2w.wake_share))
    tok0, t0 = learner.cost.trained_tokens, time.perf_counter()
    print(f"sleeping: replay{' + rehearsal' if learner.c2w.rehearsal else ''} on {budget} tokens, then consolidation ...", file=sys.stderr)
    try:
        learner.sleep()
    finally:
        learner.cfg = stored_cfg
    meta.update(writes_since_sleep=0, last_sleep=now())
    version = save_state(learner, d, meta)
    ranks = ", ".join(f"{k} rank {v}" for k, v in adapter_ranks(learner).items())
    print(f"slept: trained {learner.cost.trained_tokens - tok0} tokens in {time.perf_counter() - t0:.1f} s; "
          f"adapters {ranks}; saved {d}/{version}")
    return version


def cmd_sleep(ns) -> int:
    from c2w.state import StateError, load_state, read_status, state_lock

    d = Path(ns.state)
    try:
        _, _, status = read_status(d)
        if not status["meta"]["writes_since_sleep"] and not ns.force:
            print(f"nothing to consolidate: nothing was written since the last sleep (state {d} unchanged; "
                  f"--force sleeps anyway)")
            return 0
        with state_lock(d):
            learner, meta = load_state(d, ns.device)
            call = learner.cfg
            if ns.budget:  # tokens of this sleep: the episode budget whose sleep share is that
                share = 1 - learner.c2w.wake_share
                if share <= 0:
                    return _err("this state has --wake-share 1: its sleeps train nothing, so --budget does not apply")
                call = dataclasses.replace(call, token_budget=math.ceil(ns.budget / share))
            _sleep(learner, d, meta, call)
    except StateError as e:
        return _err(str(e))
    return 0


def cmd_ask(ns) -> int:
    from c2w.evaluation.scoring import first_line, format_prompts
    from c2w.fast import greedy_decode
    from c2w.state import StateError, load_state

    if not ns.question.strip():
        return _err("the question is empty")
    try:
        learner, _ = load_state(ns.state, ns.device, rehearsal=False)
    except StateError as e:
        return _err(str(e))
    tok = learner.tokenizer
    try:
        prompt = format_prompts(tok, [ns.question], ns.format)[0]
    except ValueError as e:
        return _err(str(e))
    # A routed learner answers a question that concerns nothing written from the frozen base.
    on = learner.route([ns.question])
    with learner.model.disable_adapter() if on == [False] else contextlib.nullcontext():
        ids = greedy_decode(learner.model, tok, [prompt], [ns.max_new_tokens])[0]
    answer = first_line(tok.decode(ids, skip_special_tokens=True)).strip()
    print(answer)
    if not answer:
        print("(the model's answer is empty)", file=sys.stderr)
    return 0


def _fmt_num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) < 1e6 else f"{x:.3g}"


def format_status(d: Path, version: str, cfg: dict, status: dict) -> str:
    meta, s = status["meta"], status["summary"]
    cost = s["cost"]
    ranks = ", ".join(f"{k} (rank {v})" for k, v in s["adapters"].items())
    gates = s["gate_counts"]
    lines = [
        f"state:      {d} ({version}, updated {meta['updated']}, created {meta['created']})",
        f"backbone:   {cfg['backbone']['name']} ({cfg['backbone']['n_params'] / 1e6:.1f}M parameters, frozen)",
        f"adapters:   {ranks}; {s['state_bytes'] / 1e6:.1f} MB stored beyond the backbone; PEFT folders in "
        f"{d / version / 'adapters'}",
        f"stored:     {s['entries']} entries in the episodic buffer (capacity {s['buffer_capacity']}); "
        f"{meta['texts_written']} of {meta['texts_observed']} observed texts written",
        f"episodes:   {meta['episodes']} (last learn {meta['last_learn'] or 'never'})",
        f"budget:     {_fmt_num(cost['trained_tokens'])} trained tokens in {cost['train_steps']} steps, "
        f"{cost['flops']:.3g} FLOPs, {cost['train_s']:.1f} s of training",
        *(["compute:    " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(cost["flops_by"].items(), key=lambda kv: -kv[1]))
           + " FLOPs"] if cost.get("flops_by") else []),
        f"sleeps:     {s['sleeps']} (last {meta['last_sleep'] or 'never'}); "
        f"{meta['writes_since_sleep']} written since, waiting in the fast adapter",
        "gate:       " + (", ".join(f"{n} {r}" for r, n in sorted(gates.items(), key=lambda kv: -kv[1]))
                          if gates else ("off" if not cfg["c2w"]["gate"] else "no decisions yet")),
    ]
    return "\n".join(lines)


def cmd_status(ns) -> int:
    from c2w.state import StateError, read_status

    d = Path(ns.state)
    try:
        version, cfg, status = read_status(d)
    except StateError as e:
        return _err(str(e))
    if ns.json:
        print(json.dumps({"state": str(d), "version": version, "config": cfg, **status}, indent=1))
    else:
        print(format_status(d, version, cfg, status))
    return 0


# --- parsers ------------------------------------------------------------------------------------
def add_learner_parsers(sub) -> None:
    from c2w.config import C2WConfig, GateConfig, LearnerConfig

    fmt = argparse.RawDescriptionHelpFormatter

    def state_arg(p):
        p.add_argument("--state", required=True, metavar="DIR", help="the state directory")

    def device_arg(p):
        p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")

    l = sub.add_parser("learn", help="observe texts as one episode: gate them, write them into the fast adapter",
                       formatter_class=fmt, description=LEARN_DESCRIPTION)
    state_arg(l)
    l.add_argument("input", metavar="PATH.jsonl|-", help="JSONL records with at least 'text', or - for stdin "
                   "(JSONL records or plain text, one per line)")
    l.add_argument("--input-format", choices=("auto", "jsonl", "text"), default="auto",
                   help="how to read the input (default: auto)")
    l.add_argument("--budget", type=_positive_int, default=None,
                   help="trained-token budget of this episode, as in `c2w bench`: the write spends "
                        "wake_share of it, --sleep the rest (default: the state's --token-budget)")
    l.add_argument("--sleep", dest="sleep_after", action="store_true", help="sleep (consolidate) after the write")
    l.add_argument("--model", default=None, help="backbone when the state is created: smollm2 (default), "
                   "tiny (tests) or a HF name/path; an existing state keeps its own")
    device_arg(l)
    g = l.add_argument_group("state settings (fixed when the state is created)")
    add_dataclass_args(g, LearnerConfig, skip=_LEARNER_SKIP)
    add_dataclass_args(g, C2WConfig, skip=_C2W_SKIP)
    add_dataclass_args(g, GateConfig)
    l.set_defaults(func=cmd_learn)

    s = sub.add_parser("sleep", help="replay (+ rehearsal if on), then consolidate the fast adapter into slow memory")
    state_arg(s)
    s.add_argument("--budget", type=_positive_int, default=None,
                   help="tokens this sleep trains (default: the state's token_budget x (1 - wake_share))")
    s.add_argument("--force", action="store_true", help="sleep even if nothing was written since the last sleep")
    device_arg(s)
    s.set_defaults(func=cmd_sleep)

    a = sub.add_parser("ask", help="answer a question from the weights alone (greedy, no retrieval)")
    state_arg(a)
    a.add_argument("question")
    a.add_argument("--format", choices=("chat", "raw"), default="chat",
                   help="chat: the question as the user turn of the chat template; raw: the prompt as is, "
                        "e.g. a cloze like 'Mira Talvik was born in' (default: chat)")
    a.add_argument("--max-new-tokens", type=_positive_int, default=48, help="default: 48")
    device_arg(a)
    a.set_defaults(func=cmd_ask)

    t = sub.add_parser("status", help="what the state holds: adapters, entries, budget used, sleeps, gate decisions")
    state_arg(t)
    t.add_argument("--json", action="store_true", help="machine-readable")
    t.set_defaults(func=cmd_status)
