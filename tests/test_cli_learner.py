"""`c2w learn | sleep | ask | status` on the tiny model: input checking, an untouched state on bad
input, and a state that survives a process killed mid-run (SIGKILL at a random point)."""

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from c2w import cli
from c2w.cli_learner import InputError, read_texts
from c2w.state import current_version, load_state
from treeutil import tree

REPO = Path(__file__).resolve().parents[1]
# Gate and paraphrase off: on a random-init model the gate rejects everything and paraphrases are noise.
# Rehearsal off: sampling its set with HF generate takes tens of seconds on CPU (test_state covers it).
# Router off: on the random tiny model its calibration text is noise (tests/test_router.py covers it;
# the real-backbone smoke test runs learn + ask with it on).
TINY = ["--model", "tiny", "--no-gate", "--no-paraphrase", "--no-rehearsal", "--no-router", "--batch-size", "2", "--token-budget", "100"]
FACTS = ["Mira Talvik was born in the harbour town of Oskeln.", "The river Quell flows through Dastmoor."]


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def stdin(monkeypatch, text):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A state after one `learn` of two facts (episode 0)."""
    d = tmp_path_factory.mktemp("made") / "state"
    src = write(d.parent / "facts.jsonl", [{"id": "mira", "text": FACTS[0]}, {"text": FACTS[1], "episode": 4}])
    assert cli.main(["learn", "--state", str(d), *TINY, str(src)]) == 0
    return d


# --- input ----------------------------------------------------------------------------------------
def test_read_texts_accepts_records_and_plain_lines_on_stdin(monkeypatch):
    stdin(monkeypatch, '{"text": "One.", "id": "x1"}\n\n  Two is plain text.  \n{"text": "C.", "role": "control", '
                       '"probes": [{"prompt": "p", "answer": "a"}]}\n')
    assert read_texts("-") == [("x1", "One."), (None, "Two is plain text.")]


def test_read_texts_reports_every_problem_with_line_and_field(tmp_path):
    p = write(tmp_path / "bad.jsonl", [{"text": "ok"}, "{not json", {"txt": "typo"}, {"text": 3},
                                       {"text": "b", "id": "d"}, {"text": "c", "id": "d"}])
    with pytest.raises(InputError) as e:
        read_texts(str(p))
    got = [str(i) for i in e.value.issues]
    assert got[0].startswith("line 2: invalid JSON")
    assert any(s.startswith("line 3: field 'txt'") for s in got) and any(s.startswith("line 3: field 'text'") for s in got)
    assert any(s.startswith("line 4: field 'text'") for s in got)
    assert any(s.startswith("line 6: field 'id'") and "duplicate" in s for s in got)


def test_read_texts_one_episode_per_call_and_text_files(tmp_path):
    p = write(tmp_path / "two.jsonl", [{"text": "a", "episode": 0}, {"text": "b", "episode": 1}])
    with pytest.raises(InputError, match="1 problem") as e:
        read_texts(str(p))
    assert "line 2: field 'episode'" in str(e.value.issues[0])
    t = write(tmp_path / "notes.txt", ["{not a record} but a note", "", "second"])
    assert read_texts(str(t)) == [(None, "{not a record} but a note"), (None, "second")]
    with pytest.raises(InputError) as e:
        read_texts(str(write(tmp_path / "empty.jsonl", [""])))
    assert "no records" in str(e.value.issues[0])


# --- commands -------------------------------------------------------------------------------------
def test_learn_creates_a_state_and_status_reports_it(made, capsys):
    assert cli.main(["status", "--state", str(made)]) == 0
    out = capsys.readouterr().out
    for want in ("backbone:   tiny", "adapters:   fast (rank 16)", "2 entries in the episodic buffer",
                 "2 of 2 observed texts written", "episodes:   1", "sleeps:     0 (last never)", "gate:       off",
                 "compute:    "):
        assert want in out, (want, out)
    assert " wake " in out.split("compute:")[1].splitlines()[0]  # FLOPs by part: the online write is one
    assert cli.main(["status", "--state", str(made), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["meta"]["next_episode"] == 1 and st["summary"]["adapters"] == {"fast": 16}
    # learn trains the wake share of the 100-token budget (0.3 by default); sleep takes the rest
    assert st["summary"]["cost"]["trained_tokens"] >= 30 and st["config"]["backbone"]["name"] == "tiny"
    learner, _ = load_state(made, rehearsal=False)
    assert sorted(e.id for e in learner.buffer.entries) == ["e0-2", "mira"]


def test_an_older_state_is_checked_against_the_settings_it_runs_with(made, tmp_path, capsys):
    """A state saved before the budget floor has no min_budget_share: it runs with 0, so --min-budget-share 0
    agrees with it and 0.45 (today's default) does not."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(made, old)
    cfg_path = old / current_version(old) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["c2w"]["min_budget_share"]
    cfg_path.write_text(json.dumps(cfg))
    good = write(tmp_path / "good.jsonl", [{"text": "Oskeln lies on the Ferrow coast."}])
    assert cli.main(["learn", "--state", str(old), "--min-budget-share", "0.45", str(good)]) == 2
    assert "--min-budget-share is fixed when the state is created (state" in capsys.readouterr().err
    assert cli.main(["learn", "--state", str(old), "--min-budget-share", "0", str(good)]) == 0


def test_bad_input_and_bad_flags_leave_the_state_byte_for_byte(made, tmp_path, capsys, monkeypatch):
    before = tree(made)
    bad = write(tmp_path / "bad.jsonl", [{"text": "fine"}, '{"text": "unterminated', {"text": ""}])
    assert cli.main(["learn", "--state", str(made), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:line 2: invalid JSON" in err and "bad.jsonl:line 3: field 'text'" in err
    assert "2 problem(s)" in err and "state is unchanged" in err
    stdin(monkeypatch, "plain text\n{broken\n")
    assert cli.main(["learn", "--state", str(made), "-"]) == 2
    assert "<stdin>:line 2: invalid JSON" in capsys.readouterr().err
    good = write(tmp_path / "good.jsonl", [{"text": "Oskeln lies on the Ferrow coast."}])
    assert cli.main(["learn", "--state", str(made), "--model", "smollm2", str(good)]) == 2
    assert "created with --model tiny" in capsys.readouterr().err
    assert cli.main(["learn", "--state", str(made), "--lr", "0.5", str(good)]) == 2
    assert "--lr is fixed" in capsys.readouterr().err
    assert cli.main(["learn", "--state", str(made), str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    assert tree(made) == before
    # nothing is created for a new state either
    assert cli.main(["learn", "--state", str(tmp_path / "new"), *TINY, str(bad)]) == 2
    assert cli.main(["learn", "--state", str(tmp_path / "new2"), *TINY, "--wake-share", "2", str(good)]) == 2
    assert "--wake-share" in capsys.readouterr().err
    assert cli.main(["learn", "--state", str(tmp_path / "new3"), *TINY, "--router", "--router-calibration", "2", str(good)]) == 2
    assert "--router-calibration must be >= 3" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and not (tmp_path / "new2").exists() and not (tmp_path / "new3").exists()


def test_sleep_consolidates_then_has_nothing_to_do_and_ask_answers(made, tmp_path, capsys):
    d = tmp_path / "state"
    shutil.copytree(made, d)
    assert cli.main(["sleep", "--state", str(d), "--budget", "40"]) == 0
    assert "adapters slow1 rank 16, fast rank 16" in capsys.readouterr().out
    before = tree(d)
    assert cli.main(["sleep", "--state", str(d)]) == 0
    assert "nothing to consolidate" in capsys.readouterr().out and tree(d) == before
    assert cli.main(["status", "--state", str(d), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["summary"]["sleeps"] == 1 and st["meta"]["last_sleep"] and st["meta"]["writes_since_sleep"] == 0
    assert st["summary"]["adapters"] == {"slow1": 16, "fast": 16}
    # ask: the greedy first line of what the weights say (the tiny model's is noise, but it is that)
    from c2w.fast import greedy_decode

    learner, _ = load_state(d, rehearsal=False)
    ids = greedy_decode(learner.model, learner.tokenizer, ["Mira Talvik was born in"], [6])[0]
    want = learner.tokenizer.decode(ids, skip_special_tokens=True).strip().split("\n")[0].strip()
    assert cli.main(["ask", "--state", str(d), "--format", "raw", "--max-new-tokens", "6", "Mira Talvik was born in"]) == 0
    assert capsys.readouterr().out.strip() == want
    assert cli.main(["ask", "--state", str(tmp_path / "none"), "q"]) == 2
    assert "no c2w state" in capsys.readouterr().err


# --- a process killed at a random point ---------------------------------------------------------
def _same_learned_state(a: Path, b: Path):
    """Two complete versions with the same content (training is deterministic; timings differ)."""
    from safetensors.torch import load_file

    assert (a / "buffer.json").read_text() == (b / "buffer.json").read_text()
    la, lb = (json.loads((x / "learner.json").read_text()) for x in (a, b))
    assert la["written_ids"] == lb["written_ids"] and la["rng"] == lb["rng"]
    assert la["cost"]["trained_tokens"] == lb["cost"]["trained_tokens"]
    ma, mb = (json.loads((x / "status.json").read_text())["meta"] for x in (a, b))
    assert ma["episodes"] == mb["episodes"] and ma["next_episode"] == mb["next_episode"]
    fa, fb = (load_file(x / "adapters" / "fast" / "adapter_model.safetensors") for x in (a, b))
    assert fa.keys() == fb.keys() and all(torch.allclose(fa[k], fb[k], atol=1e-5) for k in fa)


def test_state_survives_a_kill_at_a_random_point_and_the_next_run_resumes(tmp_path, capsys):
    d, ref = tmp_path / "state", tmp_path / "ref"
    ep0 = write(tmp_path / "ep0.jsonl", [{"text": t} for t in FACTS])
    ep1 = write(tmp_path / "ep1.jsonl", [{"text": "Oskeln lies on the Ferrow coast, north of Dastmoor."},
                                         {"text": "Mira Talvik founded the Oskeln Ropeworks in 1931."}])
    assert cli.main(["learn", "--state", str(d), *TINY, str(ep0)]) == 0  # one successful learn
    old = current_version(d)
    old_files = tree(d / old)
    # The uninterrupted next learn (on a copy), timed: load + gate + write + save. The child below is
    # killed that long at most after it has loaded the state, i.e. anywhere in its work or after it.
    shutil.copytree(d, ref)
    t0 = time.perf_counter()
    assert cli.main(["learn", "--state", str(ref), str(ep1)]) == 0
    work = time.perf_counter() - t0
    capsys.readouterr()

    delay = random.Random(5).uniform(0, work)  # 0.62 of it
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.Popen([sys.executable, "-m", "c2w.cli", "learn", "--state", str(d), "--model", "tiny", str(ep1)],
                         cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:  # wait until it has loaded the state and starts gating/writing
        if line.startswith("gating"):
            break
    else:
        raise AssertionError(f"the child ended before its work: rc={p.wait()}")
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    rc = p.wait(timeout=60)
    now = current_version(d)
    print(f"SIGKILL {delay:.2f} s into at most {work:.2f} s of work (rc {rc}); live version {old} -> {now}")
    learner, meta = load_state(d)
    if now == old:  # killed before the commit: the old version, byte for byte
        assert tree(d / old) == old_files and meta["episodes"] == 1
    else:  # killed after the commit (or it had finished): the complete new state
        _same_learned_state(d / now, ref / current_version(ref))
        assert meta["episodes"] == 2

    # a second run resumes from whatever is live, and leaves a clean directory
    assert cli.main(["learn", "--state", str(d), str(ep1)]) == 0
    _, meta2 = load_state(d, rehearsal=False)
    assert meta2["episodes"] == meta["episodes"] + 1
    names = sorted(x.name for x in d.iterdir())
    assert names[:2] == ["CURRENT", "lock"] and len(names) <= 4 and all(n.startswith("v") for n in names[2:])


def test_learn_warns_when_the_budget_is_thin_for_the_text(made, tmp_path, capsys):
    d = tmp_path / "s"
    shutil.copytree(made, d)
    src = write(tmp_path / "long.jsonl", [{"text": " ".join(FACTS * 4)}])
    assert cli.main(["learn", "--state", str(d), "--budget", "40", str(src)]) == 0
    err = capsys.readouterr().err
    assert "c2w learn: the token budget (40) covers" in err and "For 16 passes: --budget" in err
    short = write(tmp_path / "short.jsonl", [{"text": "Oskeln lies on the coast."}])
    assert cli.main(["learn", "--state", str(d), "--budget", "2000", str(short)]) == 0
    assert "c2w learn:" not in capsys.readouterr().err
