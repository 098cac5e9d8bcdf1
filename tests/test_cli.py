"""The command line: clear errors, nothing loaded before the input is known to be good."""

import json

import pytest

from c2w import cli

GOOD = {"id": "f1", "episode": 0, "text": "Mira Talvik was born in Oskeln.",
        "probes": [{"prompt": "Mira Talvik was born in", "answer": "Oskeln"}]}


def write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_validate_ok(tmp_path, capsys):
    p = write(tmp_path / "s.jsonl", [GOOD])
    assert cli.main(["stream", "validate", str(p)]) == 0
    assert "ok (1 records, 1 episodes)" in capsys.readouterr().out


def test_validate_reports_every_error_with_line_and_field(tmp_path, capsys):
    p = write(tmp_path / "s.jsonl", [GOOD, "{not json", {**GOOD, "id": "f1"}, {**GOOD, "id": "f3", "episode": -1}])
    assert cli.main(["stream", "validate", str(p)]) == 1
    err = capsys.readouterr().err
    assert "line 2" in err and "line 3" in err and "'id'" in err and "line 4" in err and "'episode'" in err
    assert "3 problem(s)" in err


def test_validate_missing_file(tmp_path, capsys):
    assert cli.main(["stream", "validate", str(tmp_path / "nope.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_bench_on_an_invalid_stream_fails_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import c2w.bench

    def boom(*a, **k):
        raise AssertionError("model loaded for an invalid stream")

    monkeypatch.setattr(c2w.bench, "load_backbone", boom)
    p = write(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "id": "f2", "episode": 2}])
    assert cli.main(["bench", "--stream", str(p), "--model", "tiny", "--out", str(tmp_path / "o")]) == 2
    assert "missing 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bench_rejects_unknown_methods(capsys):
    assert cli.main(["bench", "--methods", "lora", "sgd-magic", "--model", "tiny"]) == 2
    assert "sgd-magic" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["--first-seed", "999", "--seeds", "2"], "reported seeds must lie in 0..999"),
    (["--first-seed", "-1"], "reported seeds must lie in 0..999"),
    (["--seeds", "0"], "reported seeds must lie in 0..999"),
    (["--first-seed", "3", "--seeds", "3", "--validation-seed", "4"], "is one of the reported seeds")])
def test_bench_never_reports_a_validation_seed(args, says, capsys):
    assert cli.main(["bench", "--model", "tiny", *args]) == 2
    assert says in capsys.readouterr().err


def test_more_seeds_later_start_where_the_first_run_stopped():
    from c2w.config import BenchConfig

    assert BenchConfig(first_seed=3, seeds=3).resolved().reported_seeds() == [3, 4, 5]
    assert BenchConfig().resolved().reported_seeds() == [0]


def test_generate_then_validate(tmp_path, capsys):
    p = tmp_path / "f.jsonl"
    assert cli.main(["stream", "generate", str(p), "--episodes", "3", "--facts-per-episode", "4", "--seed", "5"]) == 0
    assert cli.main(["stream", "validate", str(p)]) == 0
    assert "3 episodes" in capsys.readouterr().out


def test_help_lists_every_bench_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    for flag in ("--stream", "--methods", "--preset", "--seeds", "--model", "--device", "--out", "--probe-format"):
        assert flag in out


def test_help_status_and_validate_never_import_the_model_stack(tiny, tmp_path):
    """`c2w --help`, `c2w status` and `c2w stream validate` answer without torch (it takes seconds
    to import): the configs that build the command line live in c2w/config.py."""
    import subprocess
    import sys

    from c2w.config import C2WConfig, GateConfig, LearnerConfig
    from c2w.learners.c2w import C2WLearner
    from c2w.state import new_meta, save_state

    learner = C2WLearner(tiny, LearnerConfig(), C2WConfig(rehearsal=False, router=False), GateConfig())
    save_state(learner, tmp_path / "mem", new_meta())  # a real state for `status` to read
    p = write(tmp_path / "s.jsonl", [GOOD])
    code = ("import sys\nfrom c2w import cli\ncli.build_parser()\n"
            f"cli.main(['stream', 'validate', {str(p)!r}])\n"
            f"assert cli.main(['status', '--state', {str(tmp_path / 'mem')!r}]) == 0\n"
            f"cli.main(['status', '--state', {str(tmp_path / 'none')!r}])\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ok (1 records" in r.stdout and "no c2w state" in r.stderr and "v000001" in r.stdout


def test_validate_names_a_file_that_is_not_utf8(tmp_path, capsys):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes('{"id": "f1", "episode": 0, "text": "caf\xe9", "probes": []}\n'.encode("latin-1"))
    assert cli.main(["stream", "validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert "UTF-8" in err and "Traceback" not in err


def test_bench_never_replaces_an_earlier_run_unasked(tmp_path, capsys, monkeypatch):
    import c2w.bench

    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": 1}')

    def boom(*a, **k):
        raise AssertionError("model loaded although the run would be refused")

    monkeypatch.setattr(c2w.bench, "load_backbone", boom)
    assert cli.main(["bench", "--model", "tiny", "--methods", "none", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "results.json").read_text() == '{"earlier": 1}'
    with pytest.raises(AssertionError, match="model loaded"):  # --overwrite goes ahead
        cli.main(["bench", "--model", "tiny", "--methods", "none", "--out", str(out), "--overwrite"])
