"""Seconds from process start to the first completed write step: the cold start of `c2w perf`'s
write workload (issue 4's target: at most 30 s on a GPU, compilation or capture included).

    python scripts/cold_start.py --device cuda --mode graph     # prints one JSON line

Random-init SmolLM2-135M shape built on the device (no tokenizer, no weights file: a real backbone
adds its load time, `c2w perf --real-weights` reports that as load_s). Run each mode in a fresh
process: imports, CUDA context, cuBLAS handles and capture all count.
"""

import os
import sys
import time


def process_start() -> float:
    """Wall-clock time this process started (Linux: /proc), so interpreter start-up counts too."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        boot = next(int(ln.split()[1]) for ln in f if ln.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def main() -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--mode", default="eager", choices=["eager", "graph", "compile"],
                    help="eager: lm_loss step; graph: GraphedWriteStep capture + first replay; compile: torch.compile'd layers")
    ap.add_argument("--batch", type=int, default=32, help="rows per step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per row")
    a = ap.parse_args()
    t0 = process_start()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from c2w.backbone import default_dtype, tiny_config
    from c2w.fast import llama, lm_loss, make_optimizer
    from c2w.perf import SMOLLM2_SHAPE

    t_import = time.time() - t0
    dev = torch.device(a.device)
    with dev:
        model = LlamaForCausalLM(tiny_config(**SMOLLM2_SHAPE)).to(default_dtype(dev)).requires_grad_(False)
    m = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    params = [p for p in m.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr=1e-4, **(dict(capturable=True) if a.mode == "graph" else {}))
    ids = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (a.batch, a.seq), device=dev)
    att = torch.ones_like(ids)
    t_model = time.time() - t0
    if a.mode == "graph":
        from c2w.fast.graphed import GraphedWriteStep

        loss = GraphedWriteStep(m, params, opt, a.batch, a.seq)(ids, att)
    else:
        llama.COMPILE = a.mode == "compile"
        loss = lm_loss(m, ids, att, att.bool())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    loss = loss.item()  # synchronises
    print(json.dumps(dict(mode=a.mode, device=a.device, batch=a.batch, seq=a.seq, import_s=round(t_import, 2),
                          model_ready_s=round(t_model, 2), first_step_done_s=round(time.time() - t0, 2),
                          loss=round(loss, 4))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
