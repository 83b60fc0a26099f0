#!/usr/bin/env bash
# `make test`: every leg, each in its own environment.
#   1. ComfyUI 0.33.0, the primary host (.venv): unit, webui, host and browser suites, whole (both node
#      designs in the browser), then the browser suite again on the newest frontend on PyPI
#      (.host/frontend-<v>, served with --front-end-root), when the bootstrap could unpack it
#   2. ComfyUI 0.12.1 and 0.3.75 (.venv-comfy-0.12, .venv-comfy-0.3): the whole host suite (a few minutes:
#      nearly every test there drives host code that changes between versions) and the browser tests
#      marked `every_host` (the panel and the card on that host's own frontend); each leg runs when the
#      bootstrap installed that host
#   3. the diffusers binding and SD.Next's webui tests (.venv-diffusers), run BESIDE legs 1-2: its runs are one-thread subprocesses
#      that leave the second core to the ComfyUI legs, and running it after them would add its whole time
#      to CI. Its output is kept in tests/artifacts/diffusers-leg.log and printed after the ComfyUI legs.
# Exits non-zero if any leg failed (after all have finished, so every leg's result is shown).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY=.venv/bin/python PYDIFF=.venv-diffusers/bin/python
mkdir -p tests/artifacts
LOG=tests/artifacts/diffusers-leg.log

echo "[test] the diffusers binding (diffusers, accelerate, PEFT) runs beside the ComfyUI legs: $LOG"
# SD.Next's LoRA code imports diffusers: its webui tests run here too (they skip in .venv, saying so).
( "$PYDIFF" -m pytest tests/diffusers tests/webui/test_sdnext.py -q -ra > "$LOG" 2>&1 ) &
DIFF_PID=$!

status=0
echo "[test] unit, webui, host and browser suites on ComfyUI 0.33.0 (the primary host)"
"$PY" -m pytest tests/unit tests/webui tests/host tests/browser -q -ra || status=1

FRONTEND="$(ls -d .host/frontend-*/ 2>/dev/null | sort -V | tail -1)"
if [ -n "$FRONTEND" ] && [ -f "$FRONTEND/index.html" ]; then
  echo "[test] browser suite on ComfyUI 0.33.0 with the newest frontend ($(basename "$FRONTEND"))"
  TLORA_FRONTEND_ROOT="$ROOT/$FRONTEND" "$PY" -m pytest tests/browser -q -ra || status=1
else
  echo "[test] SKIPPED the newest-frontend browser pass: not unpacked (see the bootstrap's message)"
fi

for pair in 0.12.1:.venv-comfy-0.12 0.3.75:.venv-comfy-0.3; do
  version="${pair%%:*}" venv="${pair#*:}"
  if [ -x "$venv/bin/python" ] && [ -f ".host/ComfyUI-$version/main.py" ]; then
    echo "[test] host suite and the every_host browser tests on ComfyUI $version"
    TLORA_COMFY_DIR="$ROOT/.host/ComfyUI-$version" "$venv/bin/python" -m pytest tests/host tests/browser \
      -m "not browser or every_host" -q -ra || status=1
  else
    echo "[test] SKIPPED the ComfyUI $version leg: it is not installed (see the bootstrap's message)"
  fi
done

wait "$DIFF_PID"; diff_status=$?
echo "[test] the diffusers binding (.venv-diffusers):"
cat "$LOG"
[ "$diff_status" -eq 0 ] || status=1
[ "$status" -eq 0 ] && echo "[test] every leg passed" || echo "[test] FAILED: see the legs above"
exit "$status"
