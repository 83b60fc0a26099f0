# Two commands for a fresh machine: `make demo` and `make test`.
PY := .venv/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: bootstrap test test-unit test-webui test-host test-012 test-03 test-diffusers test-browser demo bench clean

bootstrap:
	@bash tools/bootstrap.sh

PY012 := .venv-comfy-0.12/bin/python
PY03 := .venv-comfy-0.3/bin/python
PYDIFF := .venv-diffusers/bin/python
COMFY012 := $(CURDIR)/.host/ComfyUI-0.12.1
COMFY03 := $(CURDIR)/.host/ComfyUI-0.3.75

# Unit, webui, host and browser suites on ComfyUI 0.33.0 (the primary host), the browser suite again on
# the newest frontend; on 0.12.1 and 0.3.75 the host suite and the every_host browser tests; the diffusers
# binding in its own environment, beside them (tools/test_legs.sh says why).
test: bootstrap
	@bash tools/test_legs.sh

test-unit: bootstrap
	$(PY) -m pytest tests/unit -q

# The A1111-family extension (webui/) against the snapshots' real LoRA code; host-free otherwise.
test-webui: bootstrap
	$(PY) -m pytest tests/webui -q -ra

test-host: bootstrap
	$(PY) -m pytest tests/host -q

# The whole host and browser suites on an older host (make test runs its host suite and every_host browser tests).
test-012: bootstrap
	TLORA_COMFY_DIR=$(COMFY012) $(PY012) -m pytest tests/host tests/browser -q -ra

test-03: bootstrap
	TLORA_COMFY_DIR=$(COMFY03) $(PY03) -m pytest tests/host tests/browser -q -ra

# The diffusers binding: applying files to diffusers models, the command-line trainer, accelerate.
test-diffusers: bootstrap
	$(PYDIFF) -m pytest tests/diffusers tests/webui/test_sdnext.py -q -ra

test-browser: bootstrap
	$(PY) -m pytest tests/browser -q

# Trains a TLoRA on a procedural subject in a headless ComfyUI on the embedded default model
# (built once, ~20 min); TINY=1: the old fast path (random adapter, tiny checkpoint, no build);
# CKPT=path: that fast path on your own SD1.5/SDXL checkpoint.
demo: bootstrap
	$(PY) tools/demo.py $(if $(CKPT),--ckpt "$(CKPT)") $(if $(TINY),--tiny)

bench: bootstrap
	$(PY) benchmarks/core.py

clean:
	rm -rf .host/run out tests/artifacts
