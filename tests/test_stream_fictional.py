import dataclasses
import re
from collections import Counter

import pytest

from c2w.streams.fictional import RELATIONS, FictionalConfig, generate_fictional
from c2w.streams.validate import stream_lines, validate_lines

BIG = FictionalConfig(episodes=5, facts_per_episode=12, update_fraction=0.25, noise_per_episode=2,
                      duplicates_per_episode=2, known_per_episode=2, seed=1)


@pytest.fixture(scope="module")
def big():
    return generate_fictional(BIG)


def dump(stream):
    return stream_lines(stream)


def test_deterministic_per_seed():
    assert dump(generate_fictional(BIG)) == dump(generate_fictional(BIG))
    other = generate_fictional(dataclasses.replace(BIG, seed=2))
    assert dump(other) != dump(generate_fictional(BIG))


def test_default_config_and_meta():
    s = generate_fictional()
    assert s.name == "fictional" and s.n_episodes == 4 and len(s.records) == 24
    assert s.meta == dataclasses.asdict(FictionalConfig())
    assert all(f.metadata.get("help") for f in dataclasses.fields(FictionalConfig))


def test_generated_streams_validate(big):
    for s in (big, generate_fictional(), generate_fictional(FictionalConfig(episodes=1, facts_per_episode=1))):
        records, issues = validate_lines(dump(s))
        assert issues == [] and len(records) == len(s.records)


def test_templates_and_relations():
    assert len(RELATIONS) >= 6
    for rel in RELATIONS:
        assert len(rel.texts) >= 3 and (not rel.updates or len(rel.updates) >= 3)
        assert rel.question.startswith("Question: ") and rel.question.endswith("\nAnswer:")
        # the cloze can never be read off a text template, not even as a prefix
        cloze_stem = rel.cloze.replace("{S}", "{s}").lower()
        for t in rel.texts + rel.updates:
            assert cloze_stem not in t.replace("{S}", "{s}").lower()


def test_relations_used_and_counts(big):
    learn = [r for r in big.records if r.role == "learn"]
    assert len(learn) == BIG.episodes * BIG.facts_per_episode
    # every relation shows up: each question template leaves a fixed signature in the prompt
    sig = {rel.name: re.escape(rel.question).replace(r"\{s\}", ".+") for rel in RELATIONS}
    seen = {name for r in learn for name, pat in sig.items() if re.fullmatch(pat, r.probes[1].prompt, re.S)}
    assert seen == {rel.name for rel in RELATIONS}


def test_probes(big):
    for r in big.records:
        if r.role != "learn":
            continue
        forms = [p.form for p in r.probes]
        assert forms == ["cloze", "question"]
        assert len({p.answer for p in r.probes}) == 1
        for p in r.probes:
            assert p.prompt not in r.text, (p.prompt, r.text)
            assert p.prompt.lower() not in r.text.lower()
            assert p.answer.lower() not in p.prompt.lower(), (p.answer, p.prompt)
            assert p.answer in r.text  # the text does state the answer
            assert 1 <= len(p.answer.split()) <= 3


def test_text_templates_vary(big):
    # the same relation is written with several different templates across the stream
    starts = Counter(r.text.split()[0] for r in big.records if r.role == "learn")
    assert len(starts) > 10


def test_updates(big):
    by_id = {r.id: r for r in big.records}
    updates = [r for r in big.records if r.replaces]
    n_expected = round(BIG.update_fraction * BIG.facts_per_episode) * (BIG.episodes - 1)
    assert len(updates) == n_expected
    assert all(r.episode >= 1 and r.role == "learn" for r in updates)
    for r in updates:
        old = by_id[r.replaces]
        assert old.role == "learn" and old.episode < r.episode and old.line == 0
        assert [p.prompt for p in r.probes] == [p.prompt for p in old.probes]  # same question ...
        assert r.probes[0].answer != old.probes[0].answer  # ... new answer
        assert big.records.index(old) < big.records.index(r)
    assert not [r for r in big.records if r.episode == 0 and r.replaces]


def test_update_fraction_extremes():
    s = generate_fictional(dataclasses.replace(BIG, update_fraction=0.0))
    assert not any(r.replaces for r in s.records)
    s = generate_fictional(dataclasses.replace(BIG, update_fraction=1.0))  # as many as there are mutable facts
    assert validate_lines(dump(s))[1] == [] and sum(bool(r.replaces) for r in s.records) > BIG.facts_per_episode


def test_stress_roles(big):
    for ep in range(BIG.episodes):
        roles = Counter(r.role for r in big.episode(ep))
        assert roles["noise"] == BIG.noise_per_episode
        assert roles["duplicate"] == BIG.duplicates_per_episode
        assert roles["known"] == BIG.known_per_episode
    earlier_learn: list[str] = []
    for r in big.records:
        if r.role == "duplicate":
            assert r.text in earlier_learn and r.probes == ()
        elif r.role == "noise":
            assert r.probes == () and re.fullmatch(r"[a-z0-9 ]+", r.text)
        elif r.role == "known":
            assert len(r.probes) == 1 and r.probes[0].answer in r.text and r.probes[0].prompt not in r.text
        elif r.role == "learn":
            earlier_learn.append(r.text)
    assert len({r.text for r in big.records if r.role == "known"}) == BIG.known_per_episode * BIG.episodes
    ids = [r.id for r in big.records]
    assert len(set(ids)) == len(ids)
    assert {i[0] for i in ids} == {"f", "n", "d", "k"}


def test_entity_names_invented_and_unique(big):
    # full names of people in the stream are all distinct from each other's parts
    people = {r.probes[1].prompt[len("Question: Where was "):-len(" born?\nAnswer:")]
              for r in big.records if r.role == "learn" and "born?" in r.probes[1].prompt}
    parts = [w for p in people for w in p.split()]
    assert len(parts) == len(set(parts))
    assert not {w.lower() for w in parts} & {"the", "red", "paris", "john"}


def test_bad_config():
    with pytest.raises(ValueError):
        generate_fictional(FictionalConfig(episodes=0))
    with pytest.raises(ValueError):
        generate_fictional(FictionalConfig(update_fraction=1.5))
    with pytest.raises(ValueError):
        generate_fictional(FictionalConfig(noise_per_episode=-1))
    with pytest.raises(ValueError):
        generate_fictional(FictionalConfig(known_per_episode=10_000))
