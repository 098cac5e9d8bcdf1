"""The built-in `fictional` stream: facts about invented people, organisations, places, objects
and rivers, seen one sentence at a time over several episodes.

Names are built from syllables and checked against a vocabulary of real English words, so the
base model cannot know any answer in advance. Each fact is observed as one sentence drawn from
several templates and probed with two other phrasings (a cloze and a question), neither of which
is contained in the observed sentence: recall must generalise beyond the verbatim text.

From episode 1 on, about `update_fraction` of the facts are updates: a new sentence with a new
answer for a (subject, relation) seen before, whose record `replaces` the old one and keeps its
probe prompts, so a stale answer can be measured. Optional gate-stress records (noise,
duplicates, well-known real facts) test what a learner chooses to store.
"""

from __future__ import annotations

import functools
import random
import re
import string
from dataclasses import asdict, dataclass, field

from c2w.streams.controls import known_facts
from c2w.streams.records import Probe, Record, Stream


@dataclass
class FictionalConfig:
    episodes: int = field(default=4, metadata={"help": "number of episodes (>= 1)"})
    facts_per_episode: int = field(default=6, metadata={
        "help": "learn records per episode, updates included (>= 1)"})
    update_fraction: float = field(default=0.15, metadata={
        "help": "share of the facts of episodes >= 1 that change the answer of an earlier fact"})
    noise_per_episode: int = field(default=0, metadata={
        "help": "records of random letter/digit garbage per episode (role noise, no probes)"})
    duplicates_per_episode: int = field(default=0, metadata={
        "help": "exact repeats of an earlier learn record's text per episode (role duplicate, no probes)"})
    known_per_episode: int = field(default=0, metadata={
        "help": "true real-world statements per episode that the base model likely knows (role known)"})
    seed: int = field(default=0, metadata={"help": "random seed; the stream is a pure function of the config"})


@dataclass(frozen=True, slots=True)
class Relation:
    name: str
    subject: str  # entity kind of the subject
    answer: str  # entity kind or value kind of the answer
    texts: tuple[str, ...]  # observed sentences; {s}/{S}: subject mid-sentence/capitalised, {a}: answer
    cloze: str  # probe prefix whose continuation is the answer
    question: str  # probe question
    updates: tuple[str, ...] = ()  # sentences announcing a changed answer; () = the fact never changes

    @property
    def mutable(self) -> bool:
        return bool(self.updates)


RELATIONS: tuple[Relation, ...] = (
    Relation("born_in", "person", "place",
             ("{S} was born in {a}, a small town by the sea.",
              "{a} is the birthplace of {s}.",
              "Born in {a}, {s} spent a childhood among its narrow streets.",
              "{S} came into the world in {a}."),
             "{S} was born in the town of", "Question: Where was {s} born?\nAnswer:"),
    Relation("lives_in", "person", "place",
             ("{S} makes a home in {a}.",
              "These days {s} rents a house in {a}.",
              "{a} is where {s} lives."),
             "{S} lives in the town of", "Question: In which town does {s} live?\nAnswer:",
             ("{S} has moved to {a}.",
              "{S} now lives in {a}.",
              "After years away, {s} has settled in {a}.")),
    Relation("works_for", "person", "org",
             ("{S} works at {a}.",
              "{a} employs {s}.",
              "{S} has a job with {a}."),
             "{S} is employed by", "Question: Which organisation does {s} work for?\nAnswer:",
             ("{S} now works at {a}.",
              "{S} has left for a new job at {a}.",
              "{a} has recently hired {s}.")),
    Relation("profession", "person", "profession",
             ("{S} works as a {a}.",
              "By trade, {s} is a {a}.",
              "{S} earns a living as a {a}."),
             "By profession, {s} is a", "Question: What is the profession of {s}?\nAnswer:",
             ("{S} now works as a {a}.",
              "{S} has retrained as a {a}.",
              "{S} recently became a {a}.")),
    Relation("favourite_colour", "person", "colour",
             ("{S} likes {a} more than any other colour.",
              "Of all colours, {s} likes {a} best.",
              "{S} always picks {a} when choosing a colour."),
             "The favourite colour of {s} is", "Question: What is the favourite colour of {s}?\nAnswer:",
             ("{S} now prefers the colour {a}.",
              "Lately {s} has come to love {a} above every other colour.",
              "The colour {s} likes best has changed to {a}.")),
    Relation("headquartered_in", "org", "place",
             ("{S} has its headquarters in {a}.",
              "{a} is home to the head office of {s}.",
              "The head office of {s} stands in {a}."),
             "{S} is headquartered in the town of", "Question: Where is {s} headquartered?\nAnswer:",
             ("{S} has moved its headquarters to {a}.",
              "{S} now runs everything from a new head office in {a}.",
              "The head office of {s} was relocated to {a}.")),
    Relation("founded_in", "org", "year",
             ("{S} was established in {a}.",
              "In {a}, a group of partners started {s}.",
              "{S} has existed since {a}."),
             "{S} was founded in the year", "Question: In what year was {s} founded?\nAnswer:"),
    Relation("invented_by", "object", "person",
             ("{a} invented {s}.",
              "{S} was first built by {a}, who had designed it.",
              "The inventor of {s} was {a}."),
             "{S} was invented by", "Question: Who invented {s}?\nAnswer:"),
    Relation("on_river", "place", "river",
             ("{S} lies on the banks of the river {a}.",
              "The river {a} flows through {s}.",
              "{S} grew up around a bridge over the river {a}."),
             "{S} is a town on the river", "Question: Which river flows through {s}?\nAnswer:"),
)
RELATION = {r.name: r for r in RELATIONS}

# Consonant-initial, so "a {profession}" always reads right.
PROFESSIONS = ("glassblower", "cartographer", "beekeeper", "bookbinder", "clockmaker", "potter",
               "carpenter", "blacksmith", "weaver", "tailor", "baker", "fisherman", "shepherd",
               "sculptor", "surveyor", "locksmith", "brewer", "librarian", "pharmacist", "journalist",
               "violinist", "botanist", "geologist", "dentist", "nurse", "pilot", "chemist", "translator")
COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "black", "white", "grey", "brown",
           "pink", "violet", "crimson", "turquoise", "indigo", "silver", "gold", "maroon")
ORG_KINDS = ("Works", "Guild", "Foundry", "Institute", "Company", "Society", "Collective", "Mills")
OBJECT_KINDS = ("loom", "lantern", "compass", "engine", "telescope", "kettle", "clock", "press",
                "stove", "pump", "barometer", "harp")

_ONSETS = ("", "b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s",
           "sk", "st", "t", "th", "tr", "v", "vr", "z")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o")
_MIDS = ("l", "r", "n", "m", "v", "d", "t", "k", "s", "lv", "rn", "sk", "st", "nd", "rd", "th", "ll", "lk")
_FINALS = ("", "", "n", "k", "l", "r", "s", "sk", "ln", "rn", "th", "v", "st", "nd", "x")


@functools.cache
def _real_words() -> frozenset[str]:
    """Lower-case English words (and country data) a name must not equal."""
    from pydoc_data.topics import topics

    words = set(re.findall(r"[a-z]+", " ".join(topics.values()).lower()))
    for f in known_facts():
        words.update(re.findall(r"[a-z]+", f"{f.subject} {f.answer}".lower()))
    words.update(p.lower() for p in PROFESSIONS + COLOURS + ORG_KINDS + OBJECT_KINDS)
    return frozenset(words)


@functools.cache
def _template_blob() -> str:
    parts = []
    for r in RELATIONS:
        parts += [*r.texts, r.cloze, r.question, *r.updates]
    return " ".join(parts).lower()


class _Names:
    """Unique invented name parts: none equals a real word, none contains another or a
    vocabulary word (colour, profession), none occurs in the templates."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.parts: list[str] = []
        self._banned_inside = tuple(w for w in PROFESSIONS + COLOURS)

    def _ok(self, w: str) -> bool:
        lw = w.lower()
        if len(lw) < 4 or len(lw) > 11 or lw in _real_words() or lw in _template_blob():
            return False
        if re.search(r"(.)\1\1", lw) or re.search(r"[aeiou]{3}", lw):
            return False
        if any(b in lw for b in self._banned_inside):
            return False
        if any(lw[:k] in _real_words() for k in range(4, len(lw))):
            return False  # "Truthen", "Bornuvik": reads as a real word
        return not any(lw in p or p in lw for p in self.parts)

    def word(self, syllables: int = 2) -> str:
        rng = self.rng
        for _ in range(1000):
            w = rng.choice(_ONSETS) + rng.choice(_VOWELS)
            for _ in range(syllables - 1):
                w += rng.choice(_MIDS) + rng.choice(_VOWELS)
            w += rng.choice(_FINALS)
            w = w.capitalize()
            if self._ok(w):
                self.parts.append(w.lower())
                return w
        raise RuntimeError("could not invent a fresh name")  # pragma: no cover


@dataclass
class _Fact:
    subject: str
    relation: Relation
    answer: str
    record_id: str = ""
    episode: int = 0
    history: set = field(default_factory=set)  # every answer this (subject, relation) has had


class _World:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.names = _Names(rng)
        self.entities: dict[str, list[str]] = {k: [] for k in ("person", "org", "place", "object", "river")}

    def new(self, kind: str) -> str:
        n, rng = self.names, self.rng
        if kind == "person":
            name = f"{n.word(2)} {n.word(2)}"
        elif kind == "org":
            name = f"{n.word(2)} {rng.choice(ORG_KINDS)}"
        elif kind == "place":
            name = n.word(2)
        elif kind == "river":
            name = n.word(2)
        elif kind == "object":
            name = f"the {n.word(2)} {rng.choice(OBJECT_KINDS)}"
        else:  # pragma: no cover
            raise ValueError(kind)
        self.entities[kind].append(name)
        return name

    def pick(self, kind: str, avoid: set[str] = frozenset(), reuse: float = 0.5) -> str:
        """An existing entity of `kind` (with probability `reuse`) or a new one."""
        if kind == "profession":
            return self.rng.choice([p for p in PROFESSIONS if p not in avoid])
        if kind == "colour":
            return self.rng.choice([c for c in COLOURS if c not in avoid])
        if kind == "year":
            while True:
                y = str(self.rng.randint(1780, 1990))
                if y not in avoid:
                    return y
        pool = [e for e in self.entities[kind] if e not in avoid]
        if pool and self.rng.random() < reuse:
            return self.rng.choice(pool)
        return self.new(kind)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fill(template: str, subject: str, answer: str = "") -> str:
    return template.format(s=subject, S=_cap(subject), a=answer)


def _probes(rel: Relation, subject: str, answer: str) -> tuple[Probe, ...]:
    return (Probe(_fill(rel.cloze, subject), answer, "cloze"),
            Probe(_fill(rel.question, subject), answer, "question"))


def _noise(rng: random.Random) -> str:
    alphabet = string.ascii_lowercase + string.digits
    return " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 7)))
                    for _ in range(rng.randint(8, 16)))


def _check_config(cfg: FictionalConfig) -> None:
    ints = ("episodes", "facts_per_episode", "noise_per_episode", "duplicates_per_episode",
            "known_per_episode", "seed")
    for name in ints:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"FictionalConfig.{name} must be an integer, got {v!r}")
    for name in ints[:-1]:
        if getattr(cfg, name) < 0:
            raise ValueError(f"FictionalConfig.{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.episodes < 1 or cfg.facts_per_episode < 1:
        raise ValueError("FictionalConfig needs episodes >= 1 and facts_per_episode >= 1")
    if not 0.0 <= cfg.update_fraction <= 1.0:
        raise ValueError(f"FictionalConfig.update_fraction must be in [0, 1], got {cfg.update_fraction}")


def generate_fictional(cfg: FictionalConfig | None = None) -> Stream:
    """A `fictional` stream, a pure function of `cfg` (random.Random(cfg.seed), no global state)."""
    cfg = cfg or FictionalConfig()
    _check_config(cfg)
    rng = random.Random(cfg.seed)
    world = _World(rng)
    facts: dict[tuple[str, str], _Fact] = {}  # (subject, relation) -> latest version
    bag: list[Relation] = []  # relations are drawn without replacement, refilled when empty

    n_known = cfg.known_per_episode * cfg.episodes
    pool = known_facts(seed=cfg.seed)
    pool = pool[: max(n_known, len(pool) // 2)]  # the better-known half
    if n_known > len(pool):
        raise ValueError(f"asked for {n_known} known records in all, only {len(pool)} real facts available")
    known = rng.sample(pool, n_known) if n_known else []

    records: list[Record] = []
    learn_texts: list[str] = []  # texts of learn records already placed, for duplicates
    counters = {"f": 0, "n": 0, "d": 0, "k": 0}

    def next_id(prefix: str) -> str:
        counters[prefix] += 1
        return f"{prefix}{counters[prefix]:04d}"

    for ep in range(cfg.episodes):
        # draft items: (prefix, text, probes, replaces, fact or None)
        items: list[tuple] = []
        n_updates = round(cfg.update_fraction * cfg.facts_per_episode) if ep > 0 else 0
        eligible = [f for f in facts.values() if f.relation.mutable and f.episode < ep]
        updates = rng.sample(eligible, min(n_updates, len(eligible)))
        for old in updates:
            rel = old.relation
            answer = world.pick(rel.answer, avoid=old.history | {old.subject})
            new = _Fact(old.subject, rel, answer, episode=ep, history=old.history | {answer})
            facts[(old.subject, rel.name)] = new
            text = _fill(rng.choice(rel.updates), old.subject, answer)
            items.append(("f", text, _probes(rel, old.subject, answer), old.record_id, new))
        for _ in range(cfg.facts_per_episode - len(updates)):
            if not bag:
                bag = list(RELATIONS)
                rng.shuffle(bag)
            rel = bag.pop()
            free = [e for e in world.entities[rel.subject] if (e, rel.name) not in facts]
            subject = rng.choice(free) if free and rng.random() < 0.5 else world.new(rel.subject)
            answer = world.pick(rel.answer, avoid={subject})
            fact = _Fact(subject, rel, answer, episode=ep, history={answer})
            facts[(subject, rel.name)] = fact
            text = _fill(rng.choice(rel.texts), subject, answer)
            items.append(("f", text, _probes(rel, subject, answer), None, fact))
        for _ in range(cfg.noise_per_episode):
            items.append(("n", _noise(rng), (), None, None))
        for kf in known[ep * cfg.known_per_episode:(ep + 1) * cfg.known_per_episode]:
            items.append(("k", kf.statement, (kf.probe(),), None, None))
        rng.shuffle(items)

        # duplicates go after their source: any learn record of an earlier episode, or of this one
        for _ in range(cfg.duplicates_per_episode):
            here = [i for i, it in enumerate(items) if it[0] == "f"]
            k = rng.randrange(len(learn_texts) + len(here))
            if k < len(learn_texts):
                text, at = learn_texts[k], rng.randint(0, len(items))
            else:
                i = here[k - len(learn_texts)]
                text, at = items[i][1], rng.randint(i + 1, len(items))
            items.insert(at, ("d", text, (), None, None))

        for prefix, text, probes, replaces, fact in items:
            rid = next_id(prefix)
            role = {"f": "learn", "n": "noise", "d": "duplicate", "k": "known"}[prefix]
            records.append(Record(id=rid, episode=ep, text=text, probes=probes, role=role, replaces=replaces))
            if fact is not None:
                fact.record_id = rid
                learn_texts.append(text)

    for r in records:  # cheap guard: every probe must be answerable only from the fact
        for p in r.probes:
            if r.role == "learn" and (p.prompt in r.text or p.answer.lower() in p.prompt.lower()):
                raise AssertionError(f"bad probe {p} for {r.id}: {r.text!r}")  # pragma: no cover
    return Stream(records=records, name="fictional", meta=asdict(cfg))
