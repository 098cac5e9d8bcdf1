"""`c2w`: gated writes into a fast adapter, sleep that replays and consolidates into slow memory,
an orthogonality constraint against interference, and a router that switches the adapters on only
for inputs about something written. Each part can be switched off (the `c2w-no-*` ablations);
every part's compute is paid from the same per-episode token budget.

wake (observe):  gate the episode's texts -> build views of those written -> store them in the
                 episodic buffer -> key their tokens in the router -> train the fast adapter on
                 the views (wake_share of the budget; the episode's budget is scaled by the share
                 of texts the gate wrote, floored at min_budget_share once anything is written)
sleep (end):     refresh replay priorities -> train fast on prioritised replay of buffered views
                 (+ KL to the base on self-generated rehearsal text, with `rehearsal`; off by
                 default since session 12) -> merge fast into slow (PEFT `cat`: exact) -> fresh fast
answer:          `route(prompts)`: adapters on or off per input (memory/router.py)
"""

from __future__ import annotations

import dataclasses
import math
import random

import torch

from c2w.fast import make_optimizer
from c2w.config import ABLATIONS, C2WConfig, GateConfig, LearnerConfig  # noqa: F401  (re-exported)
from c2w.learners.base import Learner, Progress
from c2w.learners.lora import lora_config
from c2w.learners.train import epoch_sampler, windows, write_texts
from c2w.memory.bank import FAST, AdapterBank
from c2w.memory.buffer import EpisodicBuffer, Entry
from c2w.memory.gate import cloze_pairs, score_texts, text_signals, trial_pieces
from c2w.memory.rehearsal import (known_names, neighbour_prompts, openers, rehearsal_loss, sample_rehearsal,
                                   teacher_logprobs)
from c2w.memory.router import Router, base_hidden
from c2w.memory.views import build_views, paraphrases


class C2WLearner(Learner):
    name = "c2w"
    group = "c2w"
    c2w_overrides: dict = {}

    def __init__(self, backbone, cfg: LearnerConfig, c2w: C2WConfig | None = None, gate: GateConfig | None = None):
        super().__init__(backbone, cfg)
        self.c2w = c2w or dataclasses.replace(C2WConfig(), **self.c2w_overrides)
        self.gate_cfg = gate or GateConfig()
        torch.manual_seed(cfg.seed)
        self.rng = random.Random(cfg.seed)
        self.bank = AdapterBank(backbone.model, lora_config(cfg), self.c2w.max_slow_rank)
        self.buffer = EpisodicBuffer(self.c2w.buffer_capacity)
        self.gate_log: list[dict] = []
        self.sleeps = 0
        # The gate also decides how much: an episode spends budget x (written / observed) ** budget_exponent,
        # wake and sleep alike, so what the gate turns away is compute saved, not spent re-reading the rest;
        # but never less than budget x min_budget_share once it writes anything, so that the few records
        # kept from a mostly-rejected episode still get enough optimizer steps.
        self.share = 1.0
        self._sleep_marks: list[float] = []  # progress points that fall in the coming sleep (tokens into it)
        self._new_optimizer()
        n = backbone.n_params
        self.flops_fwd = 2 * n  # per token, forward only (gate signals, generation, priorities)
        self.flops_per_token = 4 * n + 6 * self.bank.n_trainable()
        self.cost.trainable_params = self.bank.n_trainable()
        self.rehearsal = None
        self.neighbours: list = []  # (sequence, base top-k log-probs) of neighbour prompts, as written
        self._names: list[str] | None = None
        if self.c2w.rehearsal and (self.c2w.sleep or self.c2w.wake_rehearsal):
            with self.bank.model.disable_adapter():
                seqs = sample_rehearsal(self.bank.model, self.tokenizer, self.c2w.n_rehearsal, seed=cfg.seed,
                                        prompts=openers(self.c2w.rehearsal_facts))
                self.rehearsal = (seqs, teacher_logprobs(self.bank.model, seqs))
            self.cost.add(self.flops_fwd * sum(len(s) for s in seqs) * 2, "setup")  # sampling + teacher pass
        self.router: Router | None = None
        if self.c2w.router:
            with self.bank.model.disable_adapter():
                seqs = sample_rehearsal(self.bank.model, self.tokenizer, self.c2w.router_calibration, seed=cfg.seed + 1,
                                        prompts=openers(True))
            self.router = Router.calibrate(self.bank.model, self.tokenizer, [self.tokenizer.decode(s) for s in seqs],
                                           self.c2w.router_layer)
            # sampling (one forward per token, KV cache) + the key pass over the first router_layer blocks
            self.cost.add(self.flops_fwd * sum(len(s) for s in seqs) * (1 + self._key_fraction()), "setup")

    def _new_optimizer(self) -> None:
        self.params = self.bank.fast_params()
        self.opt = make_optimizer(self.params, lr=self.cfg.lr)

    # --- wake -----------------------------------------------------------------------------------
    def observe_steps(self, episode, observations):
        obs = [o for o in observations if o.text.strip()]
        if not obs:
            return
        texts = [o.text for o in obs]
        if self.c2w.gate:
            scores = score_texts(self.bank.model, self.tokenizer, self.params, texts, self.buffer.texts(), self.gate_cfg)
            self.cost.add(self.flops_fwd * self._gate_tokens(texts, scores), "gate")
            self.gate_log += [{"id": o.id, "episode": episode, **dataclasses.asdict(s)} for o, s in zip(obs, scores)]
            self.share = sum(s.write for s in scores) / len(obs)
            obs = [o for o, s in zip(obs, scores) if s.write]
        if not obs:
            return
        para = [None] * len(obs)
        if self.c2w.recombination and self.c2w.paraphrase:
            with self.bank.model.disable_adapter():  # the base rewrites; grounding filter in views.py
                para = paraphrases(self.bank.model, self.tokenizer, [o.text for o in obs])
            self.cost.add(self.flops_fwd * 80 * len(obs), "views")
        raw = [windows(self.tokenizer, [o.text], self.cfg.max_len) for o in obs]  # what a write step reaches of each
        entries = [Entry(o.id, episode, o.text, build_views(o.text, p, self.c2w.recombination, self.c2w.view_style,
                                                            self.c2w.end_words, r))
                   for o, p, r in zip(obs, para, raw)]
        for e in entries:
            self.buffer.add(e)
        self.written_ids.update(o.id for o in obs)
        if self.router is not None:  # keys of every window: a key pass reads a text's first max_len tokens
            self.router.add(self._keys([w for r in raw for w in r]))
        if self.c2w.neighbour_rehearsal and self.rehearsal is not None:
            self._add_neighbours([o.text for o in obs])
        views = [v for e in entries for v in e.views]
        episode_budget = self._episode_budget()
        budget = self.wake_budget()
        # Progress points sit at fractions of the whole episode's budget, as for every learner; those
        # past the online write are measured inside the sleep that ends the episode.
        p = self.cfg.progress_points
        marks = [episode_budget * k / (p + 1) for k in range(1, p + 1)]
        self._sleep_marks = [m - budget for m in marks if m > budget]
        extra = self._rehearse if self.c2w.wake_rehearsal else self._penalty
        yield from write_texts(self.bank.model, self.tokenizer, self.opt, self.params,
                               epoch_sampler(views, self.cfg.batch_size, self.rng), budget, self.cfg.max_len,
                               self.cost, self.flops_per_token, extra_loss=extra, part="wake",
                               marks=[m for m in marks if m <= budget], bf16=self.cfg.bf16_writes)

    def _episode_budget(self) -> float:
        """Trained tokens for this episode, wake and sleep: the budget x (share written) ** exponent,
        at least the budget x min_budget_share once anything is written (nothing written: nothing spent)."""
        if self.share <= 0:
            return 0.0
        return self.cfg.token_budget * max(self.share ** self.c2w.budget_exponent, self.c2w.min_budget_share)

    def wake_budget(self) -> int:
        """Tokens of this episode's online write (all of the episode's budget without sleep); valid once
        the gate has set the share written."""
        return int(self._episode_budget() * (self.c2w.wake_share if self.c2w.sleep else 1.0))

    def _gate_tokens(self, texts: list[str], scores) -> int:
        """Forward-pass tokens the gate spent: the signals pass on every text but duplicates, the
        cloze questions, and the trial step (fwd, bwd, fwd) where it ran."""
        n_tok = lambda ts: sum(len(self.tokenizer(t, add_special_tokens=False).input_ids) for t in ts)  # noqa: E731
        scored = [t for t, s in zip(texts, scores) if s.reason != "duplicate"]
        tried = [p for t, s in zip(texts, scores) if math.isfinite(s.learnability) for p in trial_pieces(t)]
        total = n_tok(scored) + 3 * n_tok(tried)
        if self.gate_cfg.familiarity == "cloze":
            total += sum(len(self.tokenizer(q + a, add_special_tokens=False).input_ids) for _, q, a in cloze_pairs(scored))
        return total

    def _add_neighbours(self, texts: list[str]) -> None:
        """The base's answers to the written texts' questions asked about other names (rehearsal.py)."""
        if self._names is None:
            self._names = known_names(self.tokenizer, self.rehearsal[0])
        prompts = [q for t in texts for q in neighbour_prompts(t, self._names, self.rng, self.c2w.neighbours_per_text)]
        if not prompts:
            return
        with self.bank.model.disable_adapter():
            seqs = sample_rehearsal(self.bank.model, self.tokenizer, len(prompts), max_new_tokens=8,
                                    seed=self.rng.randrange(2 ** 31), prompts=prompts)
            self.neighbours += list(zip(seqs, teacher_logprobs(self.bank.model, seqs)))
        self.cost.add(self.flops_fwd * sum(len(s) for s in seqs) * 2, "rehearsal")  # sampling + teacher pass

    def _penalty(self, left: int = 0) -> tuple[torch.Tensor, int]:
        """Orthogonality of the fast update to the slow subspace (O-LoRA): sum_l |A_slow A_fast^T|^2."""
        if not self.c2w.orthogonal or self.bank.slow is None:
            return torch.zeros(()), 0
        slow = self.bank.lora_pairs(self.bank.slow)
        fast = self.bank.lora_pairs(FAST)
        pen = sum(((a_s.detach() @ a_f.T) ** 2).sum() for (a_s, _), (a_f, _) in zip(slow, fast))
        return self.c2w.orthogonal * pen, 0

    def _rehearse(self, left: int) -> tuple[torch.Tensor, int]:
        """The penalty plus KL to the base on a few of its own samples, with the tokens they cost:
        never more than `left`, so that the episode's budget is never overrun."""
        pen, _ = self._penalty()
        if self.rehearsal is None:
            return pen, 0
        seqs, teach = self.rehearsal
        k = self.c2w.rehearsal_batch
        pool = self.rng.sample(self.neighbours, min(k // 2, len(self.neighbours))) if self.neighbours else []
        pool += [(seqs[i], teach[i]) for i in self.rng.sample(range(len(seqs)), min(k - len(pool), len(seqs)))]
        picked, n = [], 0
        for s, t in pool:
            if n + len(s) <= left:
                picked.append((s, t))
                n += len(s)
        if not picked:
            return pen, 0
        kl = rehearsal_loss(self.bank.model, [s for s, _ in picked], [t for _, t in picked])
        return pen + self.c2w.rehearsal_weight * kl, n

    # --- sleep ----------------------------------------------------------------------------------
    def end_episode_steps(self, episode: int) -> Progress:
        marks, self._sleep_marks = self._sleep_marks, []
        if self.c2w.sleep and self.buffer.entries:
            yield from self.sleep_steps(marks)

    def end_episode(self, episode: int) -> None:
        for _ in self.end_episode_steps(episode):
            pass

    def sleep(self) -> None:
        for _ in self.sleep_steps():
            pass

    def sleep_steps(self, marks: list[float] = ()) -> Progress:
        """Replay + rehearsal on the rest of the episode's budget, then consolidate fast -> slow;
        yields (steps, tokens) when the sleep's trained tokens cross `marks`."""
        entries = self.buffer.entries
        sig = text_signals(self.bank.model, self.tokenizer, [e.text for e in entries])
        for e, (nll, _, _) in zip(entries, sig):
            e.priority = nll
        self.cost.add(self.flops_fwd * sum(len(self.tokenizer(e.text).input_ids) for e in entries), "priorities")
        budget = int(self._episode_budget() * (1 - self.c2w.wake_share))

        def replay_batch() -> list[str]:
            if not self.c2w.replay:  # without replay, sleep only rehearses (and consolidates)
                return []
            picked = self.buffer.sample(self.cfg.batch_size, self.rng, self.c2w.prioritised)
            return [self.rng.choice(e.views) for e in picked]

        if budget > 0 and (self.c2w.replay or self.rehearsal is not None):
            yield from write_texts(self.bank.model, self.tokenizer, self.opt, self.params, replay_batch, budget,
                                   self.cfg.max_len, self.cost, self.flops_per_token, extra_loss=self._rehearse,
                                   part="sleep", marks=marks,
                                   bf16=self.cfg.bf16_writes and self.c2w.bf16_sleep)
        self.bank.consolidate()
        self._new_optimizer()
        self.sleeps += 1

    # --- evaluation and state -------------------------------------------------------------------
    @property
    def model(self):
        return self.bank.model

    def _keys(self, texts: list[str]) -> list[torch.Tensor]:
        """The base's hidden states of written texts at the router's block; the write pays for a
        forward over the first router_layer blocks. (Routing a question at answer time is inference
        cost: it shows in the probe latency, not in the write budget.)"""
        hid = base_hidden(self.bank.model, self.tokenizer, texts, self.router.layer, max_len=self.cfg.max_len)
        self.cost.add(self.flops_fwd * self._key_fraction() * sum(len(h) + 1 for h in hid), "keys")
        return hid

    def _key_fraction(self) -> float:
        """The share of a forward pass that a router key costs (blocks up to router_layer)."""
        n_layers = getattr(self.bank.model.config, "num_hidden_layers", self.c2w.router_layer)
        return min(1.0, self.c2w.router_layer / n_layers)

    def route(self, prompts: list[str]) -> list[bool] | None:
        if self.router is None:
            return None
        return self.router.route(base_hidden(self.bank.model, self.tokenizer, prompts, self.router.layer))

    def state_bytes(self) -> int:
        return self.bank.state_bytes() + self.buffer.nbytes() + (self.router.nbytes() if self.router else 0)


def _ablation(name: str, overrides: dict) -> type[C2WLearner]:
    return type(name.replace("-", "_"), (C2WLearner,), {"name": name, "c2w_overrides": overrides})


C2W_METHODS: dict[str, type[C2WLearner]] = {n: (C2WLearner if n == "c2w" else _ablation(n, o)) for n, o in ABLATIONS.items()}
