"""Webui script entry (run by each webui at start-up): registers TLoRA with the host's LoRA loader, in one line."""
import os
import sys

# The extension's package is webui/tlora_webui beside this repository's core (tlora/); only that
# folder is put on the path (appended: the webui's own modules keep precedence).
_PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "webui")
if _PACKAGE_DIR not in sys.path:
    sys.path.append(_PACKAGE_DIR)

try:
    import tlora_webui

    _ok, _line = tlora_webui.startup_line()
except Exception as exc:  # noqa: BLE001 - never a traceback at start-up: the webui goes on without us
    _ok, _line = False, f"[TLoRA] transformed LoRA (TLoRA, arXiv 2501.08727) not enabled: {type(exc).__name__}: {exc}"
print(_line, file=sys.stdout if _ok else sys.stderr)
