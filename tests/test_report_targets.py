from c2w.report.targets import target_rows, targets_markdown


def _m(**kw):
    out = {}
    for k, v in kw.items():
        node = out
        *head, last = k.split("__")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = {"mean": v, "std": 0.0, "per_seed": [v]}
    return out


def test_targets_compare_c2w_with_lora_and_mark_misses():
    methods = {"lora": _m(forgetting=0.4, bwt=-0.4, learning_accuracy=0.5, locality__kl=1.0),
               "c2w": _m(forgetting=0.1, bwt=-0.3, learning_accuracy=0.4, locality__kl=0.5, locality__control_rel=0.99)}
    rows = {r[0]: r for r in target_rows(methods)}
    assert rows["forgetting vs lora"][3:] == ("0.250", "<= 0.5x", "yes")
    assert rows["-BWT vs lora"][3:] == ("0.750", "<= 0.5x", "**no**")
    assert rows["learning accuracy vs lora"][3:] == ("0.800", ">= 0.9x", "**no**")
    assert rows["control accuracy / base"][-1] == "yes"
    assert "stale answers persisting (diff)" not in rows  # not measured: no row, nothing inferred


def test_gate_targets_need_a_stress_stream_and_no_targets_without_c2w():
    c2w = _m(acc=0.30, gate__written_noise=0.0, gate__written_known=0.5, cost__flops=50.0)
    rows = {r[0]: r for r in target_rows({"c2w": c2w, "c2w-no-gate": _m(acc=0.31, cost__flops=100.0)})}
    assert rows["noise records written"][-1] == "yes" and rows["known records written"][-1] == "**no**"
    assert rows["final ACC vs no-gate (points)"][3] == "-1.000" and rows["write compute (FLOPs) vs no-gate"][3] == "0.500"
    assert targets_markdown({"lora": _m(acc=0.1)}) == []


def test_gate_compute_target_leaves_out_the_one_time_setup():
    # both arms pay the same setup (40); the target compares what writing the stream cost
    c2w = _m(acc=0.30, gate__written_noise=0.0, cost__flops=90.0, cost__write_flops=50.0)
    ng = _m(acc=0.31, cost__flops=140.0, cost__write_flops=100.0)
    rows = {r[0]: r for r in target_rows({"c2w": c2w, "c2w-no-gate": ng})}
    assert rows["write compute (FLOPs) vs no-gate"][3] == "0.500"
    assert rows["write compute (FLOPs) vs no-gate"][-1] == "yes"


def test_merge_joins_runs_over_the_same_streams_and_refuses_others(tmp_path, capsys):
    import json

    import pytest

    from c2w import cli
    from c2w.report.merge import MergeError, merge_results

    cfg = {"stream": "fictional", "seeds_reported": [0, 1], "token_budget": 100, "learning_rates": {"lora": 0.003}}
    a = {"config": cfg, "provenance": {"wall_s": 1.0}, "methods": {"lora": _m(acc=0.2), "c2w": _m(acc=0.3)}}
    b = {"config": {**cfg, "learning_rates": {"c2w-no-gate": 0.003}}, "methods": {"c2w-no-gate": _m(acc=0.25)}}
    merged = merge_results([a, b], ["a", "b"])
    assert list(merged["methods"]) == ["lora", "c2w", "c2w-no-gate"]
    assert merged["config"]["learning_rates"] == {"lora": 0.003, "c2w-no-gate": 0.003}
    with pytest.raises(MergeError, match="differs in token_budget, seeds_reported"):
        merge_results([a, {**b, "config": {**cfg, "token_budget": 50, "seeds_reported": [0]}}], ["a", "c"])
    with pytest.raises(MergeError, match="differs in episodes"):  # the generator's settings: another stream
        merge_results([{**a, "config": {**cfg, "episodes": 6}}, {**b, "config": {**cfg, "episodes": 4}}], ["a", "c"])
    # a stream file's runs: the generator's settings do not matter (earlier runs recorded the preset's)
    f = {**cfg, "stream": "s.jsonl"}
    old, new = {**a, "config": {**f, "episodes": 6, "stress": 0}}, {**b, "config": {**f, "episodes": None}}
    assert list(merge_results([old, new], ["old", "new"])["methods"]) == ["lora", "c2w", "c2w-no-gate"]
    # the same file name over other content is another stream (a run without a fingerprint still merges)
    fp1, fp2 = {**f, "stream_sha256": {"0": "aa", "1": "bb"}}, {**f, "stream_sha256": {"0": "aa", "1": "cc"}}
    with pytest.raises(MergeError, match="stream_sha256"):
        merge_results([{**a, "config": fp1}, {**b, "config": fp2}], ["a", "c"])
    assert len(merge_results([{**a, "config": fp1}, {**b, "config": f}], ["a", "c"])["methods"]) == 3
    with pytest.raises(MergeError, match="stream_sha256"):  # a first run without one does not let the others differ
        merge_results([{**a, "config": f}, {**b, "config": fp1}, {**b, "config": fp2}], ["a", "b", "c"])
    # one file reached by two paths is one stream when the content says so; without fingerprints the path decides
    moved = {**fp1, "stream": "/data/s.jsonl"}
    assert len(merge_results([{**a, "config": fp1}, {**b, "config": moved}], ["a", "c"])["methods"]) == 3
    with pytest.raises(MergeError, match="differs in stream"):
        merge_results([{**a, "config": f}, {**b, "config": {**f, "stream": "/data/s.jsonl"}}], ["a", "c"])
    with pytest.raises(MergeError, match="differs in stream"):  # a first run without one: the paths decide
        merge_results([{**a, "config": f}, {**b, "config": {**fp1, "stream": "/data/other.jsonl"}}], ["a", "c"])
    for name, r in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r))
    assert cli.main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    assert "c2w-no-gate" in (tmp_path / "m" / "report.md").read_text()
    assert cli.main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m2")]) == 2
    (tmp_path / "a" / "report.md").write_text("# not json")  # a run's report given for its results: one clear line
    assert cli.main(["report", str(tmp_path / "a" / "report.md"), "--out", str(tmp_path / "m2")]) == 2
    assert "not a bench run's results.json" in capsys.readouterr().err
    (tmp_path / "a" / "other.json").write_text('{"config": {}}')
    assert cli.main(["report", str(tmp_path / "a" / "other.json"), "--out", str(tmp_path / "m2")]) == 2
    assert "has no 'methods'" in capsys.readouterr().err
    # a merged report may be rewritten; a bench run's own results.json is never replaced unasked
    assert cli.main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    before = (tmp_path / "b" / "results.json").read_text()
    assert cli.main(["report", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "b" / "results.json").read_text() == before
    assert cli.main(["report", str(tmp_path / "b"), "--out", str(tmp_path / "b")]) == 0  # one run, re-rendered in place
    assert cli.main(["report", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--overwrite"]) == 0
