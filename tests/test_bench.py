"""`c2w bench` end to end on the tiny model: the results.json contract, the report, determinism."""

import json

import pytest

from c2w.bench import BenchConfig, bench
from c2w.config import GENERATOR_ONLY
from c2w.learners import BASELINES
from c2w.streams.records import Probe, Record, Stream

TIMING = {"wall_s", "train_s", "setup_s", "peak_mem_mb", "probe_latency_ratio"}


def tiny_cfg(out, **kw) -> BenchConfig:
    base = dict(model="tiny", device="cpu", seeds=2, episodes=2, facts_per_episode=3, controls=2, general_texts=2,
                token_budget=60, progress_points=1, out=str(out), stress=1)
    if kw.get("stream", "fictional") != "fictional":  # a file brings its own episodes and facts
        base = {k: v for k, v in base.items() if k not in GENERATOR_ONLY}
    return BenchConfig(**{**base, **kw})


def strip_timing(x):
    if isinstance(x, dict):
        return {k: strip_timing(v) for k, v in x.items() if k not in TIMING}
    return x


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    bench(tiny_cfg(out))
    return out


def test_results_json_has_the_documented_shape(first_run):
    res = json.loads((first_run / "results.json").read_text())
    assert set(res) == {"config", "provenance", "methods"}
    assert set(res["methods"]) == {*BASELINES, "c2w"}
    for name, m in res["methods"].items():
        for key in ("accuracy_matrix", "acc", "bwt", "fwt", "forgetting", "learning_accuracy"):
            assert set(m[key]) == {"mean", "std", "per_seed"}, (name, key)
            assert len(m[key]["per_seed"]) == 2
        assert len(m["accuracy_matrix"]["mean"]) == 2
        assert {"trained_tokens", "flops", "wall_s", "peak_mem_mb", "trainable_params", "state_bytes_per_record",
                "probe_latency_ratio"} <= set(m["cost"])
    assert res["methods"]["none"]["cost"]["trained_tokens"]["mean"] == 0
    assert res["methods"]["lora"]["cost"]["trained_tokens"]["mean"] >= 2 * 60
    assert res["methods"]["rag"]["group"] == "reference"
    prov = res["provenance"]
    assert prov["versions"]["torch"] and "hardware" in prov and prov["model"] == "tiny"
    assert res["config"]["seeds_reported"] == [0, 1] and res["config"]["validation_seed"] not in (0, 1)


def test_the_gate_log_is_saved_for_c2w_only_with_the_roles_it_never_saw(first_run):
    res = json.loads((first_run / "results.json").read_text())
    assert all("gate_log" not in res["methods"][b] for b in BASELINES)
    logs = res["methods"]["c2w"]["gate_log"]
    logs = logs["per_seed"] if isinstance(logs, dict) else [logs, logs]
    assert len(logs) == 2
    gate = res["methods"]["c2w"]["gate"]
    for seed, log in enumerate(logs):
        # stress=1: 3 facts + noise + duplicate (from episode 1) + known per episode, every one logged
        assert {g["role"] for g in log} >= {"learn", "noise", "known"}
        assert all({"id", "episode", "write", "surprise", "novelty", "learnability", "reason"} <= set(g) for g in log)
        for role in ("learn", "noise", "known"):  # the log's decisions are the ones the gate metrics count
            rows = [g for g in log if g["role"] == role]
            assert gate[f"written_{role}"]["per_seed"][seed] == pytest.approx(sum(g["write"] for g in rows) / len(rows))
        # whether the base answers a known record is checked on the base and logged with it
        known = [g for g in log if g["role"] == "known"]
        assert all(isinstance(g["base_answers"], bool) for g in known)
        assert gate["known_to_base"]["per_seed"][seed] == pytest.approx(sum(g["base_answers"] for g in known) / len(known))


def test_a_finished_run_leaves_no_partial_file(first_run):
    assert (first_run / "results.json").exists() and not (first_run / "partial.json").exists()


def test_report_and_plots_are_written(first_run):
    md = (first_run / "report.md").read_text()
    for name in BASELINES:
        assert name in md
    pngs = list(first_run.glob("*.png"))
    assert any("accuracy_matrix" in p.name for p in pngs)
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_same_seed_gives_the_same_results(first_run, tmp_path):
    again = tmp_path / "again"
    bench(tiny_cfg(again))
    a = json.loads((first_run / "results.json").read_text())["methods"]
    b = json.loads((again / "results.json").read_text())["methods"]
    assert strip_timing(a) == strip_timing(b)


def test_a_run_stopped_midway_keeps_the_finished_runs(tmp_path, monkeypatch, capsys):
    import c2w.bench as B

    calls, real = [], B.run_learner

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in the second method")
        return real(*a, **kw)

    monkeypatch.setattr(B, "run_learner", flaky)
    out = tmp_path / "stopped"
    with pytest.raises(RuntimeError, match="boom"):
        bench(tiny_cfg(out, seeds=1, methods=["none", "lora"]))
    kept = json.loads((out / "partial.json").read_text())
    assert [(f["seed"], f["method"]) for f in kept["finished"]] == [(0, "none")] and not (out / "results.json").exists()
    said = capsys.readouterr()
    assert kept["finished"][0]["result"]["accuracy_matrix"] and "1 finished run(s)" in said.out + said.err
    assert kept["learning_rates"]["lora"] > 0  # the rates the runs used, not only searched ones
    # a stopped run's partial.json is never thrown away unasked; --overwrite starts afresh
    with pytest.raises(FileExistsError, match="stopped run"):
        bench(tiny_cfg(out, seeds=1, methods=["none"]))
    calls.clear()
    monkeypatch.setattr(B, "run_learner", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("boom at once")))
    with pytest.raises(RuntimeError, match="at once"):
        bench(tiny_cfg(out, seeds=1, methods=["none"], overwrite=True))
    assert not (out / "partial.json").exists()  # the older run's finished runs do not sit beside this one


def test_first_seed_runs_and_records_later_seeds(tmp_path):
    res = bench(tiny_cfg(tmp_path / "later", first_seed=4, seeds=1, methods=["none"]))
    assert res["config"]["seeds_reported"] == [4] and res["config"]["stream_meta"]["seed"] == 4


def test_base_answers_finds_what_the_frozen_base_really_says(tiny):
    """A record counts as known to the base only when greedy decoding produces its answer."""
    from c2w.bench import base_answers
    from c2w.fast import greedy_decode
    from c2w.streams.records import Probe, Record

    prompt = "The capital of France is"
    said = tiny.tokenizer.decode(greedy_decode(tiny.model, tiny.tokenizer, [prompt], [3])[0]).split()
    assert said, "the tiny model should say something"
    recs = [Record("k1", 0, "x", (Probe(prompt, said[0]),), role="known"),
            Record("k2", 0, "y", (Probe(prompt, "Zzyzxqv"),), role="known")]
    assert base_answers(tiny, recs, "raw") == {"k1"}


def test_budget_counts_observed_text_and_warns_when_thin(tiny):
    from c2w.bench import episode_tokens
    from c2w.learners.train import MIN_PASSES, thin_budget

    n = len(tiny.tokenizer("word " * 50).input_ids)
    stream = Stream([Record("a", 0, "word " * 50, (Probe("p", "x"),)),
                     Record("c", 0, "", (Probe("The capital of France is", "Paris"),), role="control"),
                     Record("b", 1, "word " * 50, (Probe("p", "x"),)), Record("d", 1, "word " * 50, role="noise"),
                     Record("e", 2, "", (Probe("q", "y"),), role="control")])
    assert episode_tokens(tiny.tokenizer, stream) == [n, 2 * n, 0]  # controls are never observed; noise is
    assert thin_budget(MIN_PASSES * 2 * n, 2 * n, "--token-budget") is None
    assert thin_budget(10, 0, "--budget") is None  # nothing observed: nothing to warn about
    msg = thin_budget(n, 2 * n, "--token-budget")
    assert "covers 0.5 passes" in msg and f"--token-budget {round(4 * MIN_PASSES * n, -2):.0f}" in msg


def test_results_record_the_budget_passes_per_seed(first_run):
    cfg = json.loads((first_run / "results.json").read_text())["config"]
    assert set(cfg["budget_passes"]) == {"0", "1"} and all(len(v) == 2 and min(v) > 0 for v in cfg["budget_passes"].values())
    # how many probes each matrix cell averages over: 3 facts x 2 probes per episode (updates move theirs)
    assert set(cfg["probes_per_episode"]) == {"0", "1"}
    assert all(len(v) == 2 and min(v) > 0 and sum(v) <= 12 for v in cfg["probes_per_episode"].values())


def test_a_stream_file_is_never_tuned_on(tmp_path, monkeypatch, capsys):
    """A stream file is the reported stream itself (it has no validation seed): --lr-search must not
    pick learning rates on it; the run says so and keeps the defaults."""
    import c2w.bench as B
    from c2w.streams.fictional import FictionalConfig, generate_fictional
    from c2w.streams.validate import write_stream

    p = write_stream(generate_fictional(FictionalConfig(episodes=2, facts_per_episode=2, seed=7)), tmp_path / "s.jsonl")

    def no_grid(*a, **k):
        raise AssertionError("the lr grid ran on the reported stream")

    monkeypatch.setattr(B, "choose_lrs", no_grid)
    res = bench(tiny_cfg(tmp_path / "out", stream=str(p), seeds=1, methods=["lora"], lr_search=True))
    assert res["config"]["lr_search"] == {} and "stream file" in res["config"]["lr_search_skipped"]
    cap = capsys.readouterr()
    assert "--lr-search skipped" in cap.out + cap.err
    assert res["config"]["texts_over_max_len"] == {0: (0, 128)} and "longer than" not in cap.out + cap.err
    assert "can never be scored" not in cap.out + cap.err
    # the generator's sizes did not apply to the file: none recorded
    assert all(res["config"][k] in (None, 0) for k in GENERATOR_ONLY)
    # the file's content is recorded: `c2w report` refuses to merge runs over different data of one name
    from c2w.streams.validate import load_stream

    assert res["config"]["stream_sha256"] == {0: load_stream(p).fingerprint()}


def test_generator_flags_with_a_stream_file_are_refused(tmp_path):
    cfg = BenchConfig(stream=str(tmp_path / "s.jsonl"), episodes=3, stress=2)
    with pytest.raises(ValueError, match="--episodes, --stress shape the built-in generator"):
        cfg.resolved()
    with pytest.raises(ValueError, match="--update-fraction shapes the built-in generator"):  # 0 is given too
        BenchConfig(stream="s.jsonl", update_fraction=0.0).resolved()
    assert BenchConfig(stream="fictional", episodes=3).resolved().facts_per_episode == 4  # the preset fills the rest


def test_texts_longer_than_a_write_step_keeps_are_reported(tmp_path, capsys):
    from c2w.streams.validate import write_stream

    long = " ".join(["The old stone bridge over the valley was rebuilt."] * 40) + " Mira was born in Oskeln."
    recs = [Record("f1", 0, long, (Probe("Mira was born in", "Oskeln"),)),
            Record("f2", 0, "Tam lives in Prell.", (Probe("Tam lives in", "Prell"),))]
    p = write_stream(Stream(recs), tmp_path / "long.jsonl")
    res = bench(tiny_cfg(tmp_path / "out", stream=str(p), seeds=1, methods=["none"]))
    assert res["config"]["texts_over_max_len"] == {0: (1, 128)}
    cap = capsys.readouterr()
    assert "1 observed text(s) are longer than 128 tokens" in cap.out + cap.err


def test_updates_and_probes_no_metric_counts_are_named():
    from c2w.bench import unscored

    old = Record("a", 0, "Tor lives in Oskeln.", (Probe("Tor lives in", "Oskeln"),))
    bare = Record("b", 1, "Tor now lives in Prell.", (), replaces="a")  # no probes: nothing to score the update on
    same = Record("c", 1, "Tor lives in Oskeln, still.", (Probe("Tor lives in", "Oskeln"),), replaces="b")
    noise = Record("n", 1, "qz7 plorb", (Probe("qz7", "plorb"),), role="noise")
    lines = unscored(Stream([old, bare, same, noise], "t"))
    assert len(lines) == 2 and "2 update(s)" in lines[0] and "b (replaces a)" in lines[0] and "c (replaces b)" in lines[0]
    assert lines[1].startswith("1 probe(s) on noise")
    dup = Record("n", 1, "Tor lives in Oskeln.", (Probe("Tor lives in", "Oskeln"),), role="duplicate")
    assert unscored(Stream([old, dup], "t"))[0].startswith("1 probe(s) on noise or duplicate")
    good = Record("d", 1, "Tor now lives in Prell.", (Probe("Tor lives in", "Prell"),), replaces="a")
    assert unscored(Stream([old, good], "t")) == []
    later = Record("e", 2, "Tor now lives in Vemdal.", (Probe("Tor lives in", "Vemdal"),), replaces="a")
    assert unscored(Stream([old, good, later], "t")) == []  # d, replaced in turn, is measured through e
    # a partial update keeps the facts it does not ask; where its text drops one, the user is told
    two = Record("a", 0, "Tor lives in Oskeln and works at Tarn Bank.",
                 (Probe("Tor lives in", "Oskeln"), Probe("Tor works at", "Tarn Bank")))
    lines = unscored(Stream([two, good], "t"))
    assert len(lines) == 1 and "'Tarn Bank' of a (by d)" in lines[0] and "partial update" in lines[0]
    again = Record("e", 2, "Tor now lives in Vemdal.", (Probe("Tor lives in", "Vemdal"),), replaces="a")
    lines = unscored(Stream([two, good, again], "t"))  # named once, for the first record that dropped it
    assert len(lines) == 1 and lines[0].startswith("1 old answer(s)") and "(by d)" in lines[0]


def test_answers_without_a_letter_or_digit_are_named_as_unscorable():
    from c2w.bench import unscorable

    st = Stream([Record("a", 0, "The Orvik index uses the symbol %.", (Probe("The Orvik index uses the symbol", "%"),
                                                                        Probe("The index is named after", "Orvik"))),
                 Record("b", 0, "Its sign is +.", (Probe("Its sign is", " + "),))])
    assert unscorable(st) == ["%", " + "]
