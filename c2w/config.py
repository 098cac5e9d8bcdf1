"""Every user-facing setting of c2w, as typed dataclasses that double as the command line
(`c2w bench`, `c2w learn`: one flag per field, help from the field's metadata).

Nothing here imports torch or the model stack, so `c2w --help`, `c2w status` and `c2w stream
validate` answer at once; the modules that run a config import it from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

DEFAULT_MODEL = "smollm2"  # the embedded SmolLM2-135M-Instruct (c2w/backbone.py)
BASELINES = ["none", "full-ft", "lora", "lora-replay", "rag"]
# Streams of seeds below this are reported; seeds from here on only choose hyperparameters.
FIRST_VALIDATION_SEED = 1000


# --- every learner ------------------------------------------------------------------------------
@dataclass
class LearnerConfig:
    lr: float = field(default=1e-3, metadata={"help": "learning rate of the write optimiser (AdamW)"})
    token_budget: int = field(default=3000, metadata={"help": "trained tokens per episode, replay and sleep included"})
    batch_size: int = field(default=8, metadata={"help": "texts per write step"})
    max_len: int = field(default=128, metadata={"help": "tokens kept per training text"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_targets: str = field(default="all-linear", metadata={"help": "PEFT target_modules"})
    replay_fraction: float = field(default=0.5, metadata={"help": "share of each batch drawn from the replay buffer"})
    buffer_size: int = field(default=256, metadata={"help": "replay buffer capacity in texts (reservoir sampling)"})
    rag_k: int = field(default=2, metadata={"help": "passages retrieved into the prompt by `rag`"})
    # 128, not whole texts: on validation (long_docs seed 1000, examples/passages.jsonl) mean final ACC 0.276
    # against 0.243 (64: 0.260); BENCHMARKS.md, session 22
    rag_chunk_tokens: int = field(default=128, metadata={"help": "`rag` stores each observed text as windows of at most this many tokens (cut at sentence ends, as writes are: learners.train.windows); 0: whole texts"})
    progress_points: int = field(default=3, metadata={"help": "learning-speed probes per episode, at equal shares of its trained tokens (c2w: sleep included)"})
    # Off by default: every setting of the benchmark was chosen with fp32 writes (BENCHMARKS.md, session 15).
    bf16_writes: bool = field(default=False, metadata={"help": "CPU: run write steps under bf16 autocast (fp32 master weights and optimizer; the frozen weights are cast once and kept, half their fp32 size); faster where the CPU has AVX512-BF16 or AMX, slower where it has neither. c2w's sleep stays fp32 unless C2WConfig.bf16_sleep: bf16 there cost accuracy (BENCHMARKS.md, session 19). CUDA loads the backbone in bf16 anyway"})
    seed: int = 0


# --- the c2w learner (c2w/learners/c2w.py) -------------------------------------------------
@dataclass
class C2WConfig:
    gate: bool = field(default=True, metadata={"help": "gate what is written (off: write everything)"})
    recombination: bool = field(default=True, metadata={"help": "train on views (keyed, QA, grounded paraphrase), not only the raw text"})
    view_style: str = field(default="cloze-qa", metadata={"help": "views of a written text (see memory/views.py)", "choices": ["cloze-qa", "describe"]})
    # Off: see BENCHMARKS.md, session 11 (validation seeds 1000-1005).
    end_words: bool = field(default=False, metadata={"help": "cloze-qa views also ask for each sentence's last word when it is a lower-case content word (memory/views.py end_focus)"})
    paraphrase: bool = field(default=True, metadata={"help": "add the model's own grounded paraphrase to the views"})
    sleep: bool = field(default=True, metadata={"help": "sleep at episode end: replay, rehearsal, consolidation"})
    replay: bool = field(default=True, metadata={"help": "replay buffered views during sleep"})
    prioritised: bool = field(default=True, metadata={"help": "replay proportional to current NLL (off: uniform)"})
    # Off since session 12: it was there for locality, which the router now gives (control accuracy
    # 1.00 either way on validation seeds 1000-1005), and it cost what it always cost: with the router,
    # ACC 0.352 without it vs 0.205 with it, new answers 0.41 vs 0.08 (BENCHMARKS.md, session 12).
    rehearsal: bool = field(default=False, metadata={"help": "distil the base's own samples back during sleep (KL)"})
    # 0.1. Off looked better on validation seed 1000 alone; on validation seeds 1000-1002 the penalty
    # forgets less (0.108 vs 0.199 without), as in the 3-seed ablation of the revision (BENCHMARKS.md).
    orthogonal: float = field(default=0.1, metadata={"help": "weight of the |A_slow A_fast^T|^2 penalty (O-LoRA; 0 = off)"})
    # 0.3, not 0.5: on validation seeds 1000-1002 of the 6 x 4 preset, equal ACC (0.262 vs 0.255) and
    # forgetting (0.253 vs 0.239) within their spread, lower general-text KL on all three seeds
    # (0.37 vs 0.56) and higher control accuracy (0.36 vs 0.17) (BENCHMARKS.md).
    # 1 (in proportion) since session 10. Below 1 on the stress validation seeds only (session 14);
    # not adopted: see BENCHMARKS.md.
    budget_exponent: float = field(default=1.0, metadata={"help": "an episode spends token_budget x s^budget_exponent, s the share of its texts the gate wrote (1: in proportion; below 1: fewer records still get more steps each)"})
    # 0.45 since session 15: on the gate-stress validation seeds 1000-1002 (the gate writes 0.4 of each
    # episode) ACC 0.148 against 0.102 at 0, no-gate 0.146, at 0.56x no-gate's write FLOPs; 0.5 gave
    # 0.125. Normal streams, where the gate writes >= 0.5 of every episode, are untouched (BENCHMARKS.md).
    min_budget_share: float = field(default=0.45, metadata={"help": "an episode in which the gate writes anything spends at least this share of token_budget (0: the budget follows the share written alone); the few records kept from a mostly-rejected episode still get enough optimizer steps"})
    # Off: with bf16 everywhere c2w's ACC fell from 0.351 to 0.257 on validation seeds 1000-1005; with
    # bf16 in the online writes only (sleep fp32) it was 0.359 (BENCHMARKS.md, session 19).
    bf16_sleep: bool = field(default=False, metadata={"help": "with bf16 writes (LearnerConfig.bf16_writes), run sleep's replay under bf16 autocast too (off: only the online writes are bf16; sleep stays fp32)"})
    wake_share: float = field(default=0.3, metadata={"help": "share of the episode budget for online writes; the rest is sleep"})
    # Off: on the validation seed it looked better (control 0.17 vs 0.08, one control), but on the
    # 3-seed ablation of the revised c2w, dropping it lowered forgetting (0.044 vs 0.221) at equal
    # control accuracy (BENCHMARKS.md, "Revised c2w").
    rehearsal_facts: bool = field(default=False, metadata={"help": "half the rehearsal openers ask the base for facts (memory/rehearsal.py)"})
    # Off: on validation seeds 1000-1002 it cut forgetting (0.058 vs 0.253) but halved learning
    # accuracy (0.204 vs 0.380) and ACC fell (0.215 vs 0.262); rehearsal_batch 4 did better on all three.
    wake_rehearsal: bool = field(default=False, metadata={"help": "also pull towards the base (rehearsal KL) during online writes, not only in sleep"})
    rehearsal_weight: float = field(default=1.0, metadata={"help": "weight of the rehearsal KL"})
    # 4, not 2: on validation seeds 1000-1002 (6 x 4 preset) ACC 0.375 vs 0.262, forgetting 0.036 vs
    # 0.253, learning accuracy 0.317 vs 0.380, control accuracy 0.44 vs 0.36. On reported seeds 0-5
    # that gain did not carry over (ACC and forgetting unchanged; BENCHMARKS.md, session 10).
    rehearsal_batch: int = field(default=4, metadata={"help": "rehearsal sequences per sleep step"})
    n_rehearsal: int = field(default=16, metadata={"help": "rehearsal sequences sampled from the base at start"})
    # Off: on validation seeds 1000-1002 control accuracy did not move (0.444 both), ACC fell (0.150
    # vs 0.227) and forgetting rose (0.319 vs 0.197) (BENCHMARKS.md, session 11).
    neighbour_rehearsal: bool = field(default=False, metadata={"help": "also rehearse each written fact's questions asked about other names, with the base's answers (memory/rehearsal.py)"})
    neighbours_per_text: int = field(default=2, metadata={"help": "neighbour prompts per written text (neighbour_rehearsal)"})
    # On since session 12: on validation seeds 1000-1005 control accuracy 1.00 vs 0.40 at equal ACC
    # (routing changes no training), general-text KL 0.03 vs 0.36 (BENCHMARKS.md, session 12).
    router: bool = field(default=True, metadata={"help": "switch the adapters on only for inputs about something written (memory/router.py); off: always on"})
    router_layer: int = field(default=4, metadata={"help": "router: the base block whose hidden states are the keys"})
    router_calibration: int = field(default=96, metadata={"help": "router: base-written texts sampled at start (three folds: each third held out once against the rest, memory/router.py)"})
    buffer_capacity: int = field(default=512, metadata={"help": "episodic buffer size (entries)"})
    max_slow_rank: int = field(default=128, metadata={"help": "slow adapter rank cap (beyond it, SVD compression)"})


# The ablations: each drops one part, at the same budget.
ABLATIONS = {
    "c2w": {},
    "c2w-no-gate": {"gate": False},
    "c2w-no-sleep": {"sleep": False},
    "c2w-no-recombination": {"recombination": False},
    "c2w-no-replay": {"replay": False},
    "c2w-no-orthogonal": {"orthogonal": 0.0},
    "c2w-no-router": {"router": False},
    # additions, not ablations: off in c2w since session 12
    "c2w-rehearsal": {"rehearsal": True},
    "c2w-fact-rehearsal": {"rehearsal": True, "rehearsal_facts": True},
}

C2W_ABLATIONS = [n for n in ABLATIONS if n != "c2w"]


# --- the write gate (c2w/memory/gate.py) -------------------------------------------------------
FAMILIARITY_RULES = ("units", "words", "cloze")

@dataclass
class GateConfig:
    # `cloze`, not `units`: on the validation stress streams (seeds 1000-1001) the base's cloze costs
    # put every known record at <= 12.7 nats and every new fact at >= 26.4; `units` let 11 of 12
    # known records through on the reported stress run of session 8 (BENCHMARKS.md).
    familiarity: str = field(default="cloze", metadata={"help": "familiarity rule (see memory/gate.py)", "choices": list(FAMILIARITY_RULES)})
    min_unit_surprise: float = field(default=4.0, metadata={"help": "`units`: write only if some content unit costs more nats than this (else: known)"})
    # 6.5: between the known facts the validation streams' base predicts (<= 5.6 nats) and their
    # cheapest new fact (7.6); scripts/gate_signals.py prints the table. Most "known" records of the
    # stream are not predictable by a 135M base at all (currencies: 19-24 nats) and get written.
    min_word_surprise: float = field(default=6.5, metadata={"help": "`words`: write only if a word after the topic costs more nats than this"})
    # 18: between the validation known records (<= 12.7) and new facts (>= 26.4), nearer the known.
    cloze_threshold: float = field(default=18.0, metadata={"help": "`cloze`: write only if some name or number costs more nats than this, asked for from the rest of its sentence"})
    # 0.2, not 0.5: on the validation stream, new facts written in a shared sentence pattern, and
    # updates ("X now works as a chemist" after "X works as a librarian"), overlap stored texts by
    # up to 0.6 (novelty 0.4); exact and near duplicates sit at 0-0.1.
    min_novelty: float = field(default=0.2, metadata={"help": "1 - max Jaccard word overlap with stored texts"})
    # 0.011: validation noise scores <= 0.011 on the base, but new facts fall to 0.012 once the
    # model holds related facts, so no wider margin exists (0.014 turned away 2 of 24 new facts).
    min_learnability: float = field(default=0.011, metadata={"help": "relative NLL fall after one trial step (noise barely moves)"})
    # 3.4: between the validation streams' highest new fact (3.08 nats per byte on the base, a short
    # sentence of two invented names) and their lowest random-string noise (3.66). Other text sits far
    # below: French, German, Spanish, Russian, Chinese, Japanese, code, a table row, a URL 0.68-2.19
    # (scripts/gate_bytes.py; BENCHMARKS.md, session 13). Learnability alone let 0.17 of the noise through.
    max_nats_per_byte: float = field(default=3.4, metadata={"help": "write nothing the frozen base cannot compress below this many nats per UTF-8 byte (not language); 0 = off"})
    trial_lr: float = field(default=3e-2, metadata={"help": "step size of the learnability probe (normalised gradient)"})
    # "Known" means the backbone knew it before anything was written; on the current model, a restated
    # or related fact about something already written would look known (and written facts are the
    # novelty signal's business). Costs one more forward pass per text.
    familiarity_on_base: bool = field(default=True, metadata={"help": "measure familiarity on the frozen base (adapters off), not the current model"})
    top_k: int = field(default=0, metadata={"help": "write at most k texts per episode (0 = no cap)"})

    @property
    def familiarity_threshold(self) -> float:
        """Nats below which a text counts as known, under the chosen familiarity rule."""
        return {"units": self.min_unit_surprise, "words": self.min_word_surprise, "cloze": self.cloze_threshold}[self.familiarity]


# --- `c2w bench` (c2w/bench.py) -----------------------------------------------------------------
# Learning rates per method at the quick preset's size (6 episodes x 4 facts, 1,024 tokens), chosen
# by final ACC on validation streams only (`scripts/lr_grid.py`; BENCHMARKS.md has the grids):
# full-ft, lora-replay and c2w on seed 1000; lora by mean final ACC over seeds 1000-1002, because on
# seed 1000 alone its three rates differed by less than one probe. The full preset re-runs the grid.
# The c2w ablations share c2w's rate (an ablation changes one part, nothing else).
DEFAULT_LR = {"lora": 1e-3, "lora-replay": 1e-3, "full-ft": 1e-4, "c2w": 3e-3}
LR_GRID = {"lora": [3e-4, 1e-3, 3e-3], "lora-replay": [3e-4, 1e-3, 3e-3], "full-ft": [1e-5, 3e-5, 1e-4],
           "c2w": [3e-4, 1e-3, 3e-3]}


def lr_key(method: str) -> str:
    return "c2w" if method.startswith("c2w") else method

PRESETS = {
    # 6 episodes x 4 facts at 256 trained tokens per fact. The earlier 4 x 6 (1,536 tokens) let
    # full-ft at its chosen rate show no forgetting (BWT +0.007 on seeds 0-2): too few episodes
    # after a fact for interference to show. Same facts and tokens per fact, two more episodes.
    # One learning-speed probe inside each write: each is a greedy decode of the episode's probes
    # (~1.9 s on the CPU here), and a second one cost ~45 s of the default run's 15-minute limit.
    "quick": dict(seeds=1, episodes=6, facts_per_episode=4, update_fraction=0.15, controls=12,
                  general_texts=8, token_budget=1024, progress_points=1, lr_search=False),
    "full": dict(seeds=3, episodes=5, facts_per_episode=12, update_fraction=0.15, controls=24,
                 general_texts=16, token_budget=4096, progress_points=3, lr_search=True),
}


GENERATOR_ONLY = ("episodes", "facts_per_episode", "update_fraction", "stress")  # BenchConfig: fictional only


@dataclass
class BenchConfig:
    stream: str = field(default="fictional", metadata={"help": "'fictional' (built-in generator) or a JSONL stream path"})
    methods: list[str] = field(default_factory=lambda: [*BASELINES, "c2w"], metadata={"help": "methods to run (c2w ablations: c2w-no-gate, c2w-no-sleep, ...)"})
    preset: str = field(default="quick", metadata={"help": "size of the run", "choices": list(PRESETS)})
    seeds: int | None = field(default=None, metadata={"help": "number of seeds (reported seeds are first_seed..first_seed+N-1)"})
    first_seed: int = field(default=0, metadata={"help": f"first reported seed (more seeds later: --first-seed 3 --seeds 3); reported seeds stay below {FIRST_VALIDATION_SEED}"})
    model: str = field(default=DEFAULT_MODEL, metadata={"help": "'smollm2' (embedded), 'tiny' (random, for tests), or an HF name/path"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, or auto"})
    out: str | None = field(default=None, metadata={"help": "output folder (default runs/bench-<time>)"})
    overwrite: bool = field(default=False, metadata={"help": "let --out replace a run already there (else refused before anything runs)"})
    probe_format: str = field(default="raw", metadata={"help": "score probes raw or through the chat template", "choices": ["raw", "chat"]})
    episodes: int | None = field(default=None, metadata={"help": "fictional: episodes"})
    facts_per_episode: int | None = field(default=None, metadata={"help": "fictional: facts per episode"})
    update_fraction: float | None = field(default=None, metadata={"help": "fictional: share of later facts that update earlier ones"})
    stress: int = field(default=0, metadata={"help": "fictional: noise, duplicate and known records per episode (gate stress)"})
    controls: int | None = field(default=None, metadata={"help": "built-in control probes kept (those the base answers); 0 = none"})
    general_texts: int | None = field(default=None, metadata={"help": "held-out passages for general-text drift"})
    token_budget: int | None = field(default=None, metadata={"help": "trained tokens per episode, for every weight-writing method"})
    lr: float | None = field(default=None, metadata={"help": "one learning rate for all methods (skips the per-method defaults and grid)"})
    lr_search: bool | None = field(default=None, metadata={"help": "pick each method's lr from a grid on the validation seed"})
    progress_points: int | None = field(default=None, metadata={"help": "learning-speed probes inside each episode (at equal shares of its trained tokens; c2w: sleep included)"})
    bf16_writes: bool = field(default=False, metadata={"help": "CPU: every weight-writing method's online write steps under bf16 autocast (LearnerConfig.bf16_writes); c2w's sleep stays fp32 (C2WConfig.bf16_sleep)"})
    validation_seed: int = field(default=FIRST_VALIDATION_SEED, metadata={"help": "seed used only to choose hyperparameters, never reported"})

    def resolved(self) -> "BenchConfig":
        """Fill every None from the preset. With a stream file the generator's options stay unset (None,
        stress 0): the file sets its own episodes and facts, and a results.json must not record sizes
        that did not apply; giving one of them with a file is an error (it would change nothing)."""
        p = PRESETS[self.preset]
        if self.stream != "fictional":
            given = [k for k in GENERATOR_ONLY if (getattr(self, k) != 0 if k == "stress" else getattr(self, k) is not None)]
            if given:
                flags = ", ".join("--" + k.replace("_", "-") for k in given)
                raise ValueError(f"{flags} {'shape' if len(given) > 1 else 'shapes'} the built-in generator's stream "
                                 f"only; {self.stream} brings its own episodes and facts (drop {flags})")
            p = {k: v for k, v in p.items() if k not in GENERATOR_ONLY}
        return dataclasses.replace(self, **{k: v for k, v in p.items() if getattr(self, k) is None})

    def reported_seeds(self) -> list[int]:
        """The seeds whose streams are reported (of a resolved config); never a validation seed."""
        if not 0 <= self.first_seed < self.first_seed + self.seeds <= FIRST_VALIDATION_SEED:
            raise ValueError(f"reported seeds must lie in 0..{FIRST_VALIDATION_SEED - 1} ({FIRST_VALIDATION_SEED} "
                             f"and up are validation seeds); got "
                             f"--first-seed {self.first_seed} --seeds {self.seeds}")
        if self.first_seed <= self.validation_seed < self.first_seed + self.seeds:
            raise ValueError(f"--validation-seed {self.validation_seed} is one of the reported seeds; "
                             f"hyperparameters are never chosen on a reported stream")
        return list(range(self.first_seed, self.first_seed + self.seeds))
