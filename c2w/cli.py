"""The `c2w` command line."""

from __future__ import annotations

import argparse
import sys

from c2w.cliargs import add_dataclass_args, overrides


def cmd_bench(ns) -> int:
    from c2w.bench import BenchConfig, bench
    from c2w.learners import METHODS

    cfg = BenchConfig(**overrides(ns, BenchConfig))
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad:
        print(f"error: unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    try:
        cfg.resolved().reported_seeds()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = bench(cfg)
    print(f"wrote {res['config']['out'] or 'runs/'}: results.json, report.md "
          f"({res['provenance']['wall_s']:.0f} s)")
    return 0


def cmd_stream_validate(ns) -> int:
    from c2w.streams.validate import read_lines, validate_lines

    try:
        records, issues = validate_lines(read_lines(ns.path))
    except OSError as e:
        print(f"error: cannot read {ns.path}: {e.strerror}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as e:
        print(f"error: {ns.path} is not UTF-8 text: {e}", file=sys.stderr)
        return 2
    for i in issues:
        print(f"{ns.path}:{i}", file=sys.stderr)
    if issues:
        print(f"{len(issues)} problem(s) in {ns.path}", file=sys.stderr)
        return 1
    eps = 1 + max((r.episode for r in records), default=-1)
    print(f"{ns.path}: ok ({len(records)} records, {eps} episodes)")
    return 0


def cmd_stream_generate(ns) -> int:
    from c2w.streams.fictional import FictionalConfig, generate_fictional
    from c2w.streams.validate import write_stream

    stream = generate_fictional(FictionalConfig(**overrides(ns, FictionalConfig)))
    write_stream(stream, ns.output)
    print(f"wrote {ns.output} ({len(stream.records)} records, {stream.n_episodes} episodes)")
    return 0


def cmd_report(ns) -> int:
    import json
    from pathlib import Path

    from c2w.report import jsonable, write_report
    from c2w.report.merge import load_results, merge_results

    results = merge_results([load_results(p) for p in ns.runs], list(ns.runs))
    out = Path(ns.out)
    in_place = len(ns.runs) == 1 and Path(ns.runs[0]).resolve() in (out.resolve(), (out / "results.json").resolve())
    if (out / "results.json").exists() and not (ns.overwrite or in_place) \
            and "merged_from" not in load_results(out).get("config", {}):
        raise FileExistsError(f"{out} holds a bench run's own results.json, which the merged one would replace; "
                              f"choose another --out, or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    # the bench's writer: NaN becomes null, so the merged file is strict JSON like the runs it merges
    (out / "results.json").write_text(json.dumps(jsonable(results), indent=1))
    print(f"wrote {write_report(results, out)} ({len(results['methods'])} methods from {len(ns.runs)} run(s))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from c2w.config import BenchConfig
    from c2w.streams.fictional import FictionalConfig

    p = argparse.ArgumentParser(prog="c2w", description="Context-to-Weight Consolidation: write new context "
                                "into adapter weights and measure learning and forgetting.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run methods through a stream and write results.json + report.md")
    add_dataclass_args(b, BenchConfig)
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("stream", help="stream files: validate or generate").add_subparsers(dest="stream_cmd", required=True)
    v = s.add_parser("validate", help="check a JSONL stream; every error with its line and field")
    v.add_argument("path")
    v.set_defaults(func=cmd_stream_validate)
    g = s.add_parser("generate", help="write the built-in fictional stream to a JSONL file")
    g.add_argument("output")
    add_dataclass_args(g, FictionalConfig)
    g.set_defaults(func=cmd_stream_generate)
    r = sub.add_parser("report", help="(re)write report.md and plots from one or more bench runs over the same streams")
    r.add_argument("runs", nargs="+", help="bench output folders (or results.json files)")
    r.add_argument("--out", required=True, help="folder for the merged results.json, report.md and plots")
    r.add_argument("--overwrite", action="store_true", help="let --out replace a bench run's own results.json")
    r.set_defaults(func=cmd_report)
    from c2w.cli_learner import add_learner_parsers
    from c2w.perf_args import add_perf_parser

    add_learner_parsers(sub)
    add_perf_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user-facing errors: one clear line, not a traceback
        from c2w.backbone import BackboneError
        from c2w.streams.validate import StreamError

        from c2w.report.merge import MergeError

        if isinstance(e, (StreamError, BackboneError, FileNotFoundError, FileExistsError, MergeError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
