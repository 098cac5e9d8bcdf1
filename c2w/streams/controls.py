"""Real-world facts: control probes (knowledge the base model has and must keep) and the
statements used for `known` gate-stress records.

Data comes from installed packages, not from a hand-written table: capitals, languages, regions
and populations from `countryinfo`, currency and language names from `pycountry`. Candidates
are over-generated on purpose: the caller keeps only those the base model already answers
correctly (see `control_candidates`).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass, replace

from c2w.streams.records import Probe, Record, Stream

RELATIONS = ("capital", "language", "currency", "continent")
# How many places down the population ranking each relation starts: capitals are the best
# known, continents the most ambiguous (is Turkey in Europe or Asia?).
_RELATION_PENALTY = {"capital": 0, "language": 8, "currency": 12, "continent": 16}
_TOP_COUNTRIES = 120  # by population: beyond that the base model rarely knows much

_THE = {"Netherlands", "Philippines", "Maldives", "Comoros", "Seychelles", "Gambia", "Bahamas"}
_CAPITAL_FIX = {"Nur-Sultan": "Astana", "Washington D.C.": "Washington"}
_CURRENCY_FIX = {"Yuan Renminbi": "yuan", "Pound Sterling": "pound", "US Dollar": "dollar"}
_LANGUAGE_FIX = {"Modern Greek": "Greek", "Pushto": "Pashto"}


@dataclass(frozen=True, slots=True)
class KnownFact:
    subject: str  # the country, as written mid-sentence (e.g. "the United Kingdom")
    relation: str  # one of RELATIONS
    prompt: str  # cloze prefix, e.g. "The capital of France is"
    answer: str  # e.g. "Paris"
    statement: str  # a full sentence stating the fact, which never contains `prompt`
    rank: int  # the country's place in the population ranking (0 = most populous)

    def probe(self) -> Probe:
        return Probe(self.prompt, self.answer, "cloze")


def _mid(name: str) -> str:
    """A country name as it reads mid-sentence: 'the United States', 'France'."""
    if name.startswith("The "):
        return "the " + name[4:]
    if name.startswith("United ") or "Republic" in name or "Islands" in name or name in _THE:
        return "the " + name
    return name


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _currency(codes: list[str]) -> str | None:
    import pycountry

    names = []
    for code in codes:
        c = pycountry.currencies.get(alpha_3=code)
        if c is None or "(" in c.name or any(w in c.name for w in ("Fund", "Unidad", "Mvdol", "CFA", "Unit")):
            continue
        names.append(c.name)
    if len(set(names)) != 1:
        return None
    name = names[0]
    return _CURRENCY_FIX.get(name, name.split()[-1].lower())


def _language(codes: list[str]) -> str | None:
    import pycountry

    if len(codes) != 1:
        return None  # several official languages: no single right answer
    lang = pycountry.languages.get(alpha_2=codes[0])
    if lang is None:
        return None
    name = re.sub(r"\s*\(.*?\)", "", lang.name).strip()
    return _LANGUAGE_FIX.get(name, name)


def _continent(d: dict) -> str | None:
    region, sub, inter = d.get("region"), d.get("subregion"), d.get("intermediateregion")
    if region in ("Europe", "Asia", "Africa"):
        return region
    if region == "Americas":
        if sub == "Northern America":
            return "North America"
        if inter == "South America":
            return "South America"
    return None  # Oceania, the Caribbean, Central America: too ambiguous for a cloze


def _countries() -> list[dict]:
    """Sovereign-looking countries with a capital, most populous first, one per ISO code."""
    import pycountry
    from countryinfo import CountryInfo

    by_code: dict[str, dict] = {}
    for d in sorted(CountryInfo.all().values(), key=lambda d: (-(d.get("population") or 0), d.get("name", ""))):
        code = (d.get("ISO") or {}).get("alpha2")
        if not d.get("name") or not d.get("capital") or not d.get("population") or not code:
            continue
        pc = pycountry.countries.get(alpha_2=code)
        if pc is None:
            continue
        official = {pc.name, getattr(pc, "common_name", pc.name)}
        if code not in by_code or (d["name"] in official and by_code[code]["name"] not in official):
            by_code[code] = d
    rows = sorted(by_code.values(), key=lambda d: (-(d.get("population") or 0), d["name"]))
    return rows[:_TOP_COUNTRIES]


@functools.cache
def _known_facts() -> tuple[KnownFact, ...]:
    facts: list[KnownFact] = []
    for rank, d in enumerate(_countries()):
        c = _mid(d["name"])
        capital = d["capital"]
        capital = _CAPITAL_FIX.get(capital, capital)
        cand = [("capital", f"The capital of {c} is", capital, f"{capital} is the capital city of {c}.")]
        lang = _language(d.get("languages") or [])
        if lang:
            cand.append(("language", f"The official language of {c} is", lang,
                         f"Most people in {c} speak {lang}, its official language."))
        cur = _currency(d.get("currencies") or [])
        if cur:
            cand.append(("currency", f"The currency of {c} is the", cur, f"The {cur} is the money used in {c}."))
        cont = _continent(d)
        if cont:
            cand.append(("continent", f"{_cap(c)} is a country in", cont, f"{_cap(c)} lies in {cont}."))
        for rel, prompt, answer, statement in cand:
            if answer.lower() in prompt.lower() or prompt in statement:
                continue  # e.g. "The capital of Djibouti is" -> "Djibouti"
            facts.append(KnownFact(c, rel, prompt, answer, statement, rank))
    return tuple(facts)


def known_facts(n: int | None = None, seed: int = 0) -> list[KnownFact]:
    """Real-world facts, favouring populous countries and well-known relations; a seeded
    shuffle decides the order among similar ones. All of them if `n` is None."""
    facts = _known_facts()
    if n is not None and not 0 <= n <= len(facts):
        raise ValueError(f"asked for {n} known facts, only {len(facts)} available")
    rng = random.Random(seed)
    keyed = [((f.rank + _RELATION_PENALTY[f.relation] + 1) * rng.uniform(0.6, 1.4), i, f)
             for i, f in enumerate(facts)]
    keyed.sort(key=lambda t: (t[0], t[1]))
    out = [f for _, _, f in keyed]
    return out if n is None else out[:n]


def control_candidates(n: int, seed: int = 0) -> list[Record]:
    """`n` control records (role control, empty text, episode 0, ids c0001...), each with one
    cloze probe such as "The capital of France is" -> "Paris". Over-generate (ask for 3-4x
    what you need) and keep those the base model gets right."""
    return [Record(id=f"c{i:04d}", episode=0, text="", probes=(f.probe(),), role="control")
            for i, f in enumerate(known_facts(n, seed), start=1)]


def add_controls(stream: Stream, records: list[Record]) -> Stream:
    """A new stream: `stream` plus `records` as controls in episode 0, appended at the end.

    A control whose id is already taken gets a fresh c-id. A control whose probe prompt is
    also asked of an observed record (e.g. a `known` record stating the same fact) is dropped:
    the learner has seen that fact, so it would no longer measure retention alone."""
    taken = {r.id for r in stream.records}
    seen_prompts = {p.prompt for r in stream.records if r.observed for p in r.probes}
    out: list[Record] = []
    k = 0
    for r in records:
        if not r.probes:
            raise ValueError(f"control {r.id!r} has no probe")
        if any(p.prompt in seen_prompts for p in r.probes):
            continue
        rid = r.id
        if rid in taken:
            while True:
                k += 1
                rid = f"c{k:04d}"
                if rid not in taken:
                    break
        taken.add(rid)
        out.append(replace(r, id=rid, episode=0, role="control", text="", replaces=None, line=0))
    return Stream(records=list(stream.records) + out, name=stream.name,
                  meta={**stream.meta, "controls": len(out)})
