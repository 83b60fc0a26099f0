"""Webui script entry (run by A1111, Forge and reForge at start-up): registers TLoRA with the host's LoRA loader."""
import os
import sys

# The extension's package is webui/tlora_webui beside this repository's core (tlora/); only that
# folder is put on the path (appended: the webui's own modules keep precedence).
_PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "webui")
if _PACKAGE_DIR not in sys.path:
    sys.path.append(_PACKAGE_DIR)

import tlora_webui  # noqa: E402

try:
    print(f"[TLoRA] TLoRA files in models/Lora apply through {tlora_webui.install()}'s <lora:name:weight>")
except Exception as exc:  # a broken install must not stop the webui from starting
    print(f"[TLoRA] not enabled: {exc}", file=sys.stderr)
