"""The `c2w perf` flags, apart from c2w/perf.py so that building the command line never imports torch."""

from __future__ import annotations

WORKLOADS = ("write", "write_var", "scoring", "scoring_chat", "decode")


def add_perf_parser(subparsers):
    p = subparsers.add_parser("perf", help="time c2w's write and scoring paths against plain transformers + PEFT")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="device for both paths")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--batch", type=int, default=None, help="write batch (default 8 on CPU, 32 on CUDA)")
    p.add_argument("--seq", type=int, default=None, help="write sequence length (default 64 on CPU, 128 on CUDA)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per path (medians reported)")
    p.add_argument("--real-weights", action="store_true", help="load the embedded SmolLM2-135M instead of random init")
    p.add_argument("--compile", action="store_true", help="torch.compile the c2w layer stack (compile time included in warm-up)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay c2w's write step and greedy steps from CUDA graphs (CUDA only)")
    p.add_argument("--bf16-writes", action="store_true",
                   help="CPU: c2w's write steps under bf16 autocast, as the learners run them with --bf16-writes (plain stays fp32 unless --plain-bf16)")
    p.add_argument("--bf16-scoring", action="store_true",
                   help="CPU: c2w's scoring runs its blocks in bf16 (decode_and_logprobs(dtype=bfloat16); the head stays fp32, plain too unless --plain-bf16)")
    p.add_argument("--plain-bf16", action="store_true",
                   help="CPU: the plain loop under bf16 autocast too (writes, scoring, decoding), to compare like for like "
                        "with --bf16-writes / --bf16-scoring; without it plain stays fp32, as a user's default loop runs")
    p.add_argument("--profile", type=int, nargs="?", const=2, default=0, metavar="STEPS",
                   help="after the timed rounds, run STEPS more steps per path (default 2) under torch.profiler and "
                        "print where the time goes: self time by kind (matmul, attention, softmax/loss, ...) and the "
                        "largest operators (CPU) or kernels (CUDA, graph replays included); JSON: detail.<path>.profile")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--shape", default="smollm2", choices=["smollm2", "tiny"], help="model shape")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list from {','.join(WORKLOADS)}")
    p.set_defaults(func=_cmd_perf)
    return p


def _cmd_perf(ns) -> int:
    from c2w.perf import cmd_perf

    return cmd_perf(ns)
