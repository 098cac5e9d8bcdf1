"""Nats per UTF-8 byte on the frozen base (the gate's compressibility signal, memory/gate.py) for
texts unlike the built-in stream's: other languages, code, numbers, a table row, random strings.
Shows how far from `GateConfig.max_nats_per_byte` fluent text of other kinds sits.

    .venv/bin/python scripts/gate_bytes.py [--model smollm2]
"""

from __future__ import annotations

import argparse

import torch

from c2w.backbone import load_backbone
from c2w.config import GateConfig
from c2w.memory.gate import nats_per_byte, text_signals

SAMPLES = {
    "English, new names": "In 2031 the Veltrana Institute appointed Oskar Ilmenhof as its third director.",
    "French": "Le nouveau pont sur la rivière a été ouvert au public au printemps dernier.",
    "German": "Die Stadtbibliothek hat im letzten Jahr ihre Öffnungszeiten deutlich verlängert.",
    "Spanish": "La empresa anunció que abrirá una nueva fábrica en el norte del país.",
    "Russian": "Новый музей современного искусства открылся в центре города в прошлом году.",
    "Chinese": "这座新建的图书馆于去年秋天正式向公众开放。",
    "Japanese": "新しい駅は来年の春に開業する予定です。",
    "Python code": "def mean(xs):\n    return sum(xs) / len(xs) if xs else 0.0",
    "numbers": "The 2029 census counted 48,213 residents, up 3.7% from 46,492 in 2019.",
    "table row": "| Kestrel-9 | 2027 | 14.2 kg | 3,400 km | orbital |",
    "URL and IDs": "See https://example.org/reports/2031/q3?id=8841-XK for the filing (ref. AB-77231).",
    "random string": "q7v kd92x 0pz ml3 w8 tq0rn 5bx zv1 y6e",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="backbone")
    a = ap.parse_args()
    bb = load_backbone(a.model)
    with torch.no_grad():
        sig = text_signals(bb.model, bb.tokenizer, list(SAMPLES.values()))
    print(f"threshold {GateConfig().max_nats_per_byte}")
    print("| text | nats per byte | written? |")
    print("|---|---|---|")
    for (name, text), (nll, _, _) in zip(SAMPLES.items(), sig):
        r = nats_per_byte(bb.tokenizer, text, nll)
        print(f"| {name} | {r:.2f} | {'yes' if r <= GateConfig().max_nats_per_byte else 'no: not language'} |")


if __name__ == "__main__":
    main()
