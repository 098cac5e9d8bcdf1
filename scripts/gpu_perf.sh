#!/usr/bin/env bash
# Issue 4's GPU measurements in one call on a lent machine (see /work/.library/device): run from the
# repo root with the saved tokenizer carried in .devtok; results land in $OUT (or ./gpu-out).
# Each step is independent, so one failure leaves the others' numbers.
export PYTHONPATH=$PWD C2W_TOKENIZER=$PWD/.devtok PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
py=python3
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/env.txt"
$py -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/env.txt"
date -u | tee -a "$OUT/env.txt"
run() { local name=$1 lim=$2; shift 2; local t=$SECONDS
  timeout "$lim" "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"; echo "== $name rc=$? $((SECONDS - t)) s"; tail -3 "$OUT/$name.err"; }
timeout 150 $py -m pytest -q -x -p no:cacheprovider tests/test_fast_graphed.py 2>&1 | tail -3
for m in eager graph; do run "cold_$m" 90 $py scripts/cold_start.py --mode $m; cat "$OUT/cold_$m.json"; done
run perf 240 $py -m c2w.perf --device cuda --json
run perf_graphs_write 120 $py -m c2w.perf --device cuda --json --cuda-graphs --workloads write,write_var
run perf_graphs_decode 150 $py -m c2w.perf --device cuda --json --cuda-graphs --workloads scoring,decode
run perf_64x256 150 $py -m c2w.perf --device cuda --json --batch 64 --seq 256 --workloads write,write_var
run perf_64x256_graphs 120 $py -m c2w.perf --device cuda --json --batch 64 --seq 256 --cuda-graphs --workloads write
[ "${WITH_COMPILE:-0}" = 1 ] && { run cold_compile 240 $py scripts/cold_start.py --mode compile; cat "$OUT/cold_compile.json"; }
$py - "$OUT" <<'PY'
import json, pathlib, sys
from c2w.perf import format_table
for f in sorted(pathlib.Path(sys.argv[1]).glob("perf*.json")):
    try:
        print(f"--- {f.name}\n" + format_table(json.loads(f.read_text())))
    except Exception as e:  # noqa: BLE001
        print(f"--- {f.name}: unreadable ({e})")
PY
