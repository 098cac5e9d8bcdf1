import pytest

from c2w.streams.controls import RELATIONS, add_controls, control_candidates, known_facts
from c2w.streams.fictional import FictionalConfig, generate_fictional
from c2w.streams.records import Probe, Record, Stream
from c2w.streams.validate import stream_lines, validate_lines


def test_candidates_shape_and_determinism():
    c = control_candidates(48, seed=0)
    assert len(c) == 48 and c == control_candidates(48, seed=0)
    assert c != control_candidates(48, seed=1)
    assert [r.id for r in c] == [f"c{i:04d}" for i in range(1, 49)]
    for r in c:
        assert r.role == "control" and r.text == "" and r.episode == 0 and len(r.probes) == 1
        p = r.probes[0]
        assert p.prompt and p.answer and p.answer.lower() not in p.prompt.lower()
    assert len({r.probes[0].prompt for r in c}) == 48


def test_candidates_content():
    prompts = {r.probes[0].prompt: r.probes[0].answer for r in control_candidates(200)}
    assert prompts.get("The capital of France is") == "Paris"
    assert prompts.get("The capital of Japan is") == "Tokyo"
    assert prompts.get("The capital of the United Kingdom is") == "London"
    assert prompts.get("The currency of Japan is the") == "yen"
    # favour well-known countries: the first candidates are about populous countries
    first = control_candidates(10)
    assert any("China" in r.probes[0].prompt or "India" in r.probes[0].prompt for r in first)


def test_known_facts():
    facts = known_facts()
    assert {f.relation for f in facts} == set(RELATIONS) and len(facts) > 200
    for f in facts:
        assert f.prompt not in f.statement and f.answer in f.statement
    with pytest.raises(ValueError):
        control_candidates(len(facts) + 1)


def test_add_controls():
    s = generate_fictional(FictionalConfig(episodes=2, facts_per_episode=3))
    c = control_candidates(5)
    out = add_controls(s, c)
    assert out.records[: len(s.records)] == s.records and len(out.records) == len(s.records) + 5
    assert validate_lines(stream_lines(out))[1] == []
    assert all(r.episode == 0 and r.role == "control" and not r.observed for r in out.records[len(s.records):])
    assert out.meta["controls"] == 5 and s.meta.get("controls") is None  # input untouched


def test_add_controls_renames_colliding_ids_and_drops_seen_facts():
    s = Stream([Record("c0001", 0, "Some learned text."),
                Record("k1", 0, "Paris is the capital city of France.",
                       (Probe("The capital of France is", "Paris"),), role="known")])
    c = [Record("c0001", 0, "", (Probe("The capital of Japan is", "Tokyo"),), role="control"),
         Record("c0002", 0, "", (Probe("The capital of France is", "Paris"),), role="control")]
    out = add_controls(s, c)
    added = out.records[2:]
    assert [r.probes[0].answer for r in added] == ["Tokyo"]
    assert added[0].id != "c0001" and validate_lines(stream_lines(out))[1] == []
    with pytest.raises(ValueError):
        add_controls(s, [Record("c9", 0, "", (), role="control")])


def test_known_records_in_fictional_come_from_known_facts():
    s = generate_fictional(FictionalConfig(episodes=2, facts_per_episode=2, known_per_episode=3, seed=4))
    statements = {f.statement for f in known_facts()}
    known = [r for r in s.records if r.role == "known"]
    assert len(known) == 6 and all(r.text in statements for r in known)
