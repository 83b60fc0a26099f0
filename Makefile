# Two commands for a fresh machine: `make demo` and `make test`.
PY := .venv/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: bootstrap test test-unit test-host test-browser demo bench clean

bootstrap:
	@bash scripts/bootstrap.sh

test: bootstrap
	$(PY) -m pytest tests/unit tests/host tests/browser -q -ra

test-unit: bootstrap
	$(PY) -m pytest tests/unit -q

test-host: bootstrap
	$(PY) -m pytest tests/host -q

test-browser: bootstrap
	$(PY) -m pytest tests/browser -q

# Trains a TLoRA on a procedural subject in a headless ComfyUI on the embedded default model
# (built once, ~20 min); TINY=1: the old fast path (random adapter, tiny checkpoint, no build);
# CKPT=path: that fast path on your own SD1.5/SDXL checkpoint.
demo: bootstrap
	$(PY) scripts/demo.py $(if $(CKPT),--ckpt "$(CKPT)") $(if $(TINY),--tiny)

bench: bootstrap
	$(PY) benchmarks/core.py

clean:
	rm -rf .host/run out tests/artifacts
