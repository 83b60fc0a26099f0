#!/usr/bin/env bash
# `make test`: every leg, each in its own environment.
#   1. unit, webui, host and browser suites on ComfyUI 0.3.75 (.venv)
#   2. host and browser suites on ComfyUI 0.12.1 (.venv-comfy-0.12), when the bootstrap installed it
#   3. the diffusers binding (.venv-diffusers), run BESIDE legs 1-2: its runs are one-thread subprocesses
#      that leave the second core to the ComfyUI legs, and running it after them would add its whole time
#      to CI. Its output is kept in tests/artifacts/diffusers-leg.log and printed after the ComfyUI legs.
# Exits non-zero if any leg failed (after all have finished, so every leg's result is shown).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY=.venv/bin/python PY012=.venv-comfy-0.12/bin/python PYDIFF=.venv-diffusers/bin/python
COMFY012="$ROOT/.host/ComfyUI-0.12.1"
mkdir -p tests/artifacts
LOG=tests/artifacts/diffusers-leg.log

echo "[test] the diffusers binding (diffusers, accelerate, PEFT) runs beside the ComfyUI legs: $LOG"
( "$PYDIFF" -m pytest tests/diffusers -q -ra > "$LOG" 2>&1 ) &
DIFF_PID=$!

status=0
echo "[test] unit, webui, host and browser suites on ComfyUI 0.3.75"
"$PY" -m pytest tests/unit tests/webui tests/host tests/browser -q -ra || status=1
if [ -x "$PY012" ] && [ -f "$COMFY012/main.py" ]; then
  echo "[test] host and browser suites on ComfyUI 0.12.1"
  TLORA_COMFY_DIR="$COMFY012" "$PY012" -m pytest tests/host tests/browser -q -ra || status=1
else
  echo "[test] SKIPPED the ComfyUI 0.12.1 leg: it is not installed (see the bootstrap's message)"
fi

wait "$DIFF_PID"; diff_status=$?
echo "[test] the diffusers binding (.venv-diffusers):"
cat "$LOG"
[ "$diff_status" -eq 0 ] || status=1
[ "$status" -eq 0 ] && echo "[test] every leg passed" || echo "[test] FAILED: see the legs above"
exit "$status"
