import json
import os

import pytest

from c2w.streams.records import Probe, Record, Stream
from c2w.streams.validate import StreamError, StreamIssue, load_stream, validate_lines, write_stream


def line(**kw) -> str:
    base = {"id": "f1", "episode": 0, "text": "Mira Talvik was born in Oskeln.",
            "probes": [{"prompt": "Mira Talvik was born in the town of", "answer": "Oskeln"}]}
    base.update(kw)
    return json.dumps({k: v for k, v in base.items() if v is not ...})


GOOD = [
    line(),
    line(id="c1", text="", role="control", probes=[{"prompt": "The capital of France is", "answer": "Paris"}]),
    line(id="n1", episode=1, text="qz7 plorb vrek 8812", role="noise", probes=[]),
    line(id="f2", episode=1, text="Mira Talvik now lives in Prell.", replaces="f1",
         probes=[{"prompt": "Q?", "answer": "Prell", "form": "question"}], meta={"source": "test"}),
    "",
    "   ",
    line(id="f3", episode=2, probes=...),
]


def issues_of(lines):
    records, issues = validate_lines(lines)
    return records, [(i.line, i.field) for i in issues], issues


def test_good_stream():
    records, found, _ = issues_of(GOOD)
    assert found == []
    assert [r.id for r in records] == ["f1", "c1", "n1", "f2", "f3"]
    assert [r.line for r in records] == [1, 2, 3, 4, 7]
    assert records[3].replaces == "f1" and records[3].probes == (Probe("Q?", "Prell", "question"),)
    assert records[1].role == "control" and records[4].probes == ()


@pytest.mark.parametrize("bad, where", [
    ('{"id": "f1", "episode": 0,', (1, "")),                       # bad JSON
    ("[1, 2]", (1, "")),                                            # not an object
    (line(text=...), (1, "text")),                                  # missing field
    (line(id=...), (1, "id")),
    (line(episode=...), (1, "episode")),
    (line(id=7), (1, "id")),                                        # mistyped
    (line(id=""), (1, "id")),
    (line(text=3), (1, "text")),
    (line(episode="0"), (1, "episode")),
    (line(episode=-1), (1, "episode")),                             # negative
    (line(episode=True), (1, "episode")),                           # bool is not an int
    (line(episode=1.0), (1, "episode")),
    (line(text="  "), (1, "text")),                                 # empty learn text
    (line(role="noise", text=""), (1, "text")),
    (line(role="teach"), (1, "role")),                              # bad role
    (line(epsiode=0), (1, "epsiode")),                              # unknown field
    (line(probes=[{"prompt": "p"}]), (1, "probes[0].answer")),      # probe missing answer
    (line(probes=[{"prompt": "", "answer": "a"}]), (1, "probes[0].prompt")),
    (line(probes=[{"prompt": "p", "answer": "a", "from": "x"}]), (1, "probes[0].from")),
    (line(probes=[{"prompt": "p", "answer": "a", "form": 1}]), (1, "probes[0].form")),
    (line(probes=["p"]), (1, "probes[0]")),
    (line(probes={"prompt": "p", "answer": "a"}), (1, "probes")),
    (line(role="control", text="", probes=[]), (1, "probes")),      # control without probe
    (line(meta="x"), (1, "meta")),
    (line(replaces="nowhere"), (1, "replaces")),                    # replaces to nowhere
    (line(replaces=3), (1, "replaces")),
    ('{"id": "f1", "episode": 0, "text": "caf\\ud83d"}', (1, "text")),  # a lone surrogate escape
    ('{"id": "f\\udc00", "episode": 0, "text": "x"}', (1, "id")),
    (line(probes=[{"prompt": "p", "answer": "\ud83d"}]), (1, "probes[0].answer")),
])
def test_each_bad_line(bad, where):
    records, found, issues = issues_of([bad])
    assert where in found, issues
    assert records == []


def test_bad_json_message_has_line_and_json_reason():
    _, _, issues = issues_of([line(), "{oops"])
    assert issues[0].line == 2 and "invalid JSON" in issues[0].message and "(column 2)" in issues[0].message


def test_duplicate_id():
    records, found, issues = issues_of([line(), line()])
    assert found == [(2, "id")] and "first used on line 1" in issues[0].message
    assert [r.line for r in records] == [1]


def test_replaces_forward_and_to_later_episode():
    _, found, _ = issues_of([line(id="a", replaces="b"), line(id="b")])
    assert found == [(1, "replaces")]
    _, found, _ = issues_of([line(id="a", replaces="a")])
    assert found == [(1, "replaces")]
    # target on an earlier line but in a later episode
    _, found, issues = issues_of([line(id="a", episode=1), line(id="b", episode=0, replaces="a")])
    assert found == [(2, "replaces")] and "episode 1" in issues[0].message
    # same episode is fine
    _, found, _ = issues_of([line(id="a"), line(id="b", replaces="a")])
    assert found == []


def test_controls_neither_replace_nor_are_replaced():
    ctrl = line(id="c1", text="", role="control", probes=[{"prompt": "The capital of France is", "answer": "Paris"}])
    _, found, issues = issues_of([ctrl, line(id="f2", replaces="c1")])
    assert found == [(2, "replaces")] and "'c1' is a control record" in issues[0].message
    _, found, issues = issues_of([line(id="f1"), line(id="c2", text="", role="control", replaces="f1",
                                                     probes=[{"prompt": "p", "answer": "a"}])])
    assert found == [(2, "replaces")] and "cannot replace" in issues[0].message


def test_episode_gap_and_empty():
    _, found, issues = issues_of([line(id="a"), line(id="b", episode=1), line(id="c", episode=3)])
    assert found == [(0, "episode")] and issues[0].message.endswith("missing 2")
    assert str(issues[0]).startswith("stream: field 'episode'")
    _, found, issues = issues_of([line(id="a", episode=2)])
    assert "missing 0, 1" in issues[0].message
    _, found, _ = issues_of(["", "  "])
    assert found == [(0, "")]
    # line order does not matter, only contiguity
    _, found, _ = issues_of([line(id="b", episode=1), line(id="a", episode=0)])
    assert found == []


def test_all_errors_reported_at_once():
    lines = [line(), "{bad", line(id="f1"), line(id="x", episode=-1, role="oops", typo=1), "",
             line(id="y", episode=5, replaces="zz")]
    _, found, issues = issues_of(lines)
    assert (2, "") in found and (3, "id") in found
    assert {(4, "episode"), (4, "role"), (4, "typo")} <= set(found)
    assert (6, "replaces") in found and (0, "episode") in found
    assert found == sorted(found, key=lambda t: (t[0] == 0, t[0]))  # line order, file-level last


def test_issue_str():
    assert str(StreamIssue(7, "episode", "must be an integer >= 0, got -1")) == \
        "line 7: field 'episode': must be an integer >= 0, got -1"
    assert str(StreamIssue(3, "", "invalid JSON: x")) == "line 3: invalid JSON: x"


def test_load_stream(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text("\n".join(GOOD) + "\n", encoding="utf-8")
    s = load_stream(p)
    assert s.name == "mine" and s.n_episodes == 3 and s.records[3].line == 4


def test_load_stream_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="stream file not found"):
        load_stream(tmp_path / "nope.jsonl")
    p = tmp_path / "bad.jsonl"
    p.write_text(line(episode=-1) + "\n" + line(id="g", role="x") + "\n", encoding="utf-8")
    with pytest.raises(StreamError) as e:
        load_stream(p)
    assert len(e.value.issues) == 2 and isinstance(e.value, ValueError)
    msg = str(e.value)
    assert str(p) in msg and "line 1: field 'episode'" in msg and "line 2: field 'role'" in msg
    p.write_bytes("\ufeff".encode() + line().encode() + b"\r\n" + line(id="g").encode() + b"\r\n")  # BOM, CRLF
    assert [r.id for r in load_stream(p).records] == ["f1", "g"]
    p.write_bytes(b"\xff\xfe\n")
    with pytest.raises(StreamError, match="UTF-8"):
        load_stream(p)


def test_write_round_trip(tmp_path):
    recs = [Record("f1", 0, "Mira Talvik was born in Oskeln.", (Probe("Mira Talvik was born in", "Oskeln", "cloze"),)),
            Record("c1", 0, "", (Probe("The capital of France is", "Paris"),), role="control"),
            Record("f2", 1, "Mira Talvik now lives in Prell — ü.", (Probe("Q", "Prell"),), replaces="f1"),
            Record("n1", 1, "zz 88 qq", role="noise")]
    p = write_stream(Stream(recs, name="x"), tmp_path / "sub" / "rt.jsonl")
    back = load_stream(p)
    assert back.name == "rt"
    assert [r.to_json() for r in back.records] == [r.to_json() for r in recs]
    assert [r.line for r in back.records] == [1, 2, 3, 4]
    assert [f for f in os.listdir(p.parent)] == ["rt.jsonl"]  # no temp file left behind


def test_write_refuses_invalid_stream(tmp_path):
    bad = Stream([Record("f1", 1, "text")])  # episode 0 missing
    with pytest.raises(StreamError):
        write_stream(bad, tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()


def test_unicode_line_separators_inside_text_round_trip(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028, U+2029 and U+0085 raw inside strings; JSONL
    lines end at "\\n" only (str.splitlines would cut those records in half)."""
    text = "Line one\u2028line two\u2029para\x85next, all one record."
    recs = [Record("f1", 0, text, (Probe("Where?\u2028", "Oskeln"),))]
    p = write_stream(Stream(recs, name="x"), tmp_path / "u.jsonl")
    assert "\u2028" in p.read_text(encoding="utf-8")  # written raw
    back = load_stream(p)
    assert back.records[0].text == text and back.records[0].probes[0].prompt == "Where?\u2028"


def test_far_episode_gap_is_summarised():
    """One record in episode 10^8 must not list (or build) 10^8 missing episodes."""
    _, found, issues = issues_of([line(id="a"), line(id="b", episode=10 ** 8)])
    assert found == [(0, "episode")]
    msg = issues[0].message
    assert len(msg) < 300 and msg.endswith("missing 1-99999999")
    eps = [line(id=f"e{k}", episode=3 * k) for k in range(30)]  # 29 gaps of two: the first ten, then a count
    msg = issues_of(eps)[2][0].message
    assert msg.endswith("missing 1, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16, 17, 19, 20, 22, 23, 25, 26, 28, 29 and 19 more runs")


def test_a_streams_fingerprint_follows_its_content_not_its_name():
    from c2w.streams.records import Probe, Record, Stream

    a = Stream([Record("f1", 0, "Mira lives in Prell.", (Probe("Mira lives in", "Prell"),))], "s.jsonl")
    assert a.fingerprint() == Stream(list(a.records), "other.jsonl").fingerprint()
    edited = Stream([Record("f1", 0, "Mira lives in Prell.", (Probe("Mira lives in", "Oskeln"),))], "s.jsonl")
    assert edited.fingerprint() != a.fingerprint() and len(a.fingerprint()) == 16
