"""The diffusers binding's tests: they run in `.venv-diffusers` only (`make test` runs them there).

In another environment (ComfyUI's .venv has no diffusers) the folder is skipped with a reason,
never failed or half-run. The pack is imported as the installed `comfyui_tlora` package (the
bootstrap installs it editable), the way users and `accelerate launch -m` import it.
"""
import pytest

pytest.importorskip("diffusers", reason="the diffusers binding's tests run in .venv-diffusers (make test)")
pytest.importorskip("accelerate", reason="the diffusers binding's tests run in .venv-diffusers (make test)")
