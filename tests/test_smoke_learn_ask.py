"""`c2w learn` then `c2w ask` on the real SmolLM2-135M-Instruct weights: a new fictional fact is
written into the adapters and answered from the weights alone (no retrieval)."""

import json

import pytest

from c2w import cli

FACT = "Mira Talvik was born in the harbour town of Oskeln."


@pytest.mark.slow
def test_learn_then_ask_answers_a_new_fact(tmp_path, capsys):
    state = tmp_path / "state"
    src = tmp_path / "facts.jsonl"
    src.write_text(json.dumps({"id": "mira", "text": FACT}) + "\n")
    cloze = "Mira Talvik was born in the harbour town of"

    # The router samples its calibration text (96 short sequences) from the base when the state is
    # created. Rehearsal is off only to skip sampling its set when the state is created (HF sampling of 16
    # sequences takes minutes on a loaded 2-core CPU); only sleep uses it, and this test does not
    # sleep. The gate and the paraphrase view are on: the fact goes through the pipeline as a
    # user's would (test_smoke_real checks that the base does not know it). --budget 2000: the write
    # trains 600 tokens (wake_share 0.3), 5 steps on the fact's 6 views; in our runs 4 steps already
    # recalled it, 3 (without the paraphrase view) did not.
    assert cli.main(["learn", "--state", str(state), "--model", "smollm2", "--no-rehearsal",
                     "--budget", "2000", str(src)]) == 0
    out = capsys.readouterr().out
    assert "1 of 1 text(s) written" in out, out

    assert cli.main(["ask", "--state", str(state), "--format", "raw", cloze, "--max-new-tokens", "8"]) == 0
    answer = capsys.readouterr().out.strip()
    # Asked as a raw cloze, the form the write trains most directly (the text itself and views that
    # continue from its names). The chat form also answered in our runs ("Where was Mira Talvik
    # born?" -> "Mira Talvik was born in the port city of Oskeln."), but it rewords the fact and,
    # with a handful of write steps, is one greedy path from drifting: it is not asserted here.
    assert "Oskeln" in answer, answer
    # The router (on by default) sends a question about nothing written to the frozen base, which
    # knows this one; the write must not have replaced it with a name from the stream.
    assert cli.main(["ask", "--state", str(state), "--format", "raw", "The capital of France is",
                     "--max-new-tokens", "6"]) == 0
    assert "Paris" in capsys.readouterr().out

    assert cli.main(["status", "--state", str(state), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["summary"]["entries"] == 1 and st["summary"]["gate_counts"] == {"write": 1}
