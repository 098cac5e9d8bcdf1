"""`c2w perf` runs end to end on a tiny shape and returns the JSON shape (speed is not asserted)."""

import argparse
import json

import pytest
import torch

from c2w.perf import add_perf_parser, format_table, run_perf


def test_run_perf_tiny_shape(tiny):
    n = torch.get_num_threads()
    res = run_perf(shape="tiny", batch=2, seq=12, repeats=1, scoring_prompts=3, decode_tokens=2,
                   decode_batches=(1, 2), threads=1, tokenizer=tiny.tokenizer)
    assert torch.get_num_threads() == n  # restored
    for w in ("write", "write_var", "scoring", "scoring_chat", "decode"):
        r = res[w]
        assert r["plain"] > 0 and r["c2w"] > 0 and r["ratio"] > 0
        for tag in ([None] if w != "decode" else ["1", "2"]):
            d = (r if tag is None else r["by_batch"][tag])["detail"]
            for path in ("plain", "c2w"):
                assert d[path]["tokens_per_s"] > 0 and d[path]["ms_per_step"] > 0 and d[path]["mfu"] > 0
                assert d[path]["peak_mem_mb"] >= 0
    assert res["write"]["loss_abs_diff"] <= 1e-5
    assert res["scoring"]["logprob_max_abs_diff"] <= 1e-4 and res["scoring"]["greedy_rows_identical"] == 1.0
    json.dumps(res)
    assert "c2w/plain" in format_table(res)


def test_perf_bf16_writes_times_the_autocast_step_and_reports_its_agreement(tiny):
    res = run_perf(shape="tiny", batch=2, seq=12, repeats=1, threads=1, tokenizer=tiny.tokenizer,
                   workloads=["write"], bf16_writes=True)
    assert res["setup"]["bf16_writes"] is True
    r = res["write"]
    assert r["c2w"] > 0 and r["plain"] > 0
    # bf16 matmuls move the loss, a little: not the fp32 path's 1e-5, not more than bf16 rounding
    assert 1e-7 < r["loss_abs_diff"] / r["loss_plain"] < 2e-2
    assert "bf16 autocast" in format_table(res)


def test_perf_bf16_scoring_reports_its_agreement(tiny):
    res = run_perf(shape="tiny", repeats=1, threads=1, tokenizer=tiny.tokenizer, scoring_prompts=4,
                   workloads=["scoring"], bf16_scoring=True)
    assert res["setup"]["bf16_scoring"] is True
    assert 1e-6 < res["scoring"]["logprob_max_abs_diff"] <= 0.05  # bf16 ran; within the stated tolerance
    assert "--bf16-scoring" in format_table(res)
    # the cast plan's kept memory is reported, and freed again after the workload
    from c2w.fast import llama

    assert res["scoring"]["detail"]["c2w"]["kept_mb"] > 0 and "keeps" in format_table(res)
    assert llama.kept_bytes() == 0


def test_perf_plain_bf16_runs_the_plain_side_under_autocast(tiny):
    """--plain-bf16: the plain loop (write and scoring) runs under CPU bf16 autocast, so against c2w's
    fp32 paths it no longer agrees to fp32 precision."""
    res = run_perf(shape="tiny", batch=2, seq=12, repeats=1, threads=1, tokenizer=tiny.tokenizer, scoring_prompts=4,
                   workloads=["write", "scoring"], plain_bf16=True)
    assert res["setup"]["plain_bf16"] is True
    w = res["write"]
    assert 1e-7 < w["loss_abs_diff"] / w["loss_plain"] < 2e-2  # fp32 against fp32 is within 1e-5 (above)
    assert 1e-5 < res["scoring"]["logprob_max_abs_diff"] <= 0.1
    assert "--plain-bf16" in format_table(res)


def test_perf_parser_flags():
    ap = argparse.ArgumentParser()
    add_perf_parser(ap.add_subparsers(dest="command"))
    ns = ap.parse_args(["perf", "--device", "cpu", "--json", "--batch", "4", "--seq", "32", "--repeats", "2",
                        "--real-weights", "--compile", "--bf16-writes", "--bf16-scoring", "--plain-bf16"])
    assert (ns.device, ns.json, ns.batch, ns.seq, ns.repeats, ns.real_weights, ns.compile, ns.bf16_writes,
            ns.bf16_scoring, ns.plain_bf16) == ("cpu", True, 4, 32, 2, True, True, True, True, True)
    assert callable(ns.func)


def test_ratio_rounds_pair_each_rounds_plain_and_c2w_times():
    """The spread printed beside the median ratio comes from rounds timed back to back."""
    from c2w.perf import _result

    stats = {"gemm_gflops": 1.0,
             "plain": dict(tokens=100, tokens_per_s=50.0, ms_per_step=2000.0, mfu=0.1, peak_mem_mb=1.0, times_s=[2.0, 4.0, 2.0]),
             "c2w": dict(tokens=100, tokens_per_s=100.0, ms_per_step=1000.0, mfu=0.2, peak_mem_mb=1.0, times_s=[1.0, 1.0, 0.5])}
    r = _result(stats)
    assert r["ratio"] == 2.0 and r["ratio_rounds"] == [2.0, 4.0, 4.0]
    table = format_table({"setup": dict(device_name="x", device="cpu", dtype="float32", threads=1, model="m",
                                         lora=dict(r=16), repeats=3, matmul_peak_gflops=1.0), "write": r})
    assert "2.00x  (2.00-4.00)" in table


def test_mfu_of_a_bf16_path_is_against_the_bf16_gemm():
    """A CPU path whose matmuls run in bf16 is held against the bf16 GEMM's rate, not the fp32 one
    (which once gave c2w's bf16 write step an MFU of 130%)."""
    from c2w.perf import Side, _compare

    asked = []

    def probe(bf16=False):
        asked.append(bf16)
        return 4e9 if bf16 else 1e9

    sides = [Side("plain", lambda: None, 10, 1e6, []), Side("c2w", lambda: None, 10, 1e6, [], bf16=True)]
    out = _compare(torch.device("cpu"), sides, 3, probe)
    assert sorted(asked) == [False] * 3 + [True] * 3
    assert out["gemm_gflops"] == 1.0 and out["gemm_bf16_gflops"] == 4.0
    for name, peak in (("plain", 1e9), ("c2w", 4e9)):
        d = out[name]
        assert d["mfu"] == pytest.approx(1e6 / (d["ms_per_step"] / 1e3) / peak)
    only_fp32 = _compare(torch.device("cpu"), [Side("plain", lambda: None, 10, 1e6, [])], 1, probe)
    assert "gemm_bf16_gflops" not in only_fp32
    only_bf16 = _compare(torch.device("cpu"), [Side("plain", lambda: None, 10, 1e6, [], bf16=True)], 1, probe)
    assert "gemm_gflops" not in only_bf16 and only_bf16["gemm_bf16_gflops"] == 4.0


def test_perf_bf16_options_report_the_bf16_gemm(tiny):
    res = run_perf(shape="tiny", batch=2, seq=12, repeats=1, threads=1, tokenizer=tiny.tokenizer,
                   workloads=["write"], bf16_writes=True)
    assert res["setup"]["matmul_peak_bf16_gflops"] > 0 and res["write"]["gemm_bf16_gflops"] > 0
    assert "bf16" in format_table(res).splitlines()[0]
    assert "matmul_peak_bf16_gflops" not in run_perf(shape="tiny", batch=2, seq=12, repeats=1, threads=1,
                                                     tokenizer=tiny.tokenizer, workloads=["write"])["setup"]


def test_perf_decode_reports_graph_captures_and_reuses(tiny, monkeypatch):
    """With --cuda-graphs, the warm-up call captures and the timed calls reuse the kept step (off CUDA
    the same static step runs eagerly, so the bookkeeping is checked here)."""
    from c2w.fast import decode
    from c2w.perf import bench_decode, load_model

    model, tok = load_model("tiny", False, torch.device("cpu"), torch.float32, tiny.tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(decode, "CUDA_GRAPHS", True)
    try:
        r = bench_decode(model, tok, torch.device("cpu"), [1, 2], 3, 2, lambda bf16=False: 1e9, n_params,
                         dict(r=4, lora_alpha=8, target_modules="all-linear"))
    finally:
        decode.clear_graphs()
    for b in ("1", "2"):
        assert (r["by_batch"][b]["graph_captures"], r["by_batch"][b]["graph_reuses"]) == (1, 2)
        assert r["by_batch"][b]["greedy_rows_identical"] == 1.0
