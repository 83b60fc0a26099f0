"""The Train TLoRA node's inputs are TrainSettings: same names, defaults, ranges and options (real host)."""
from __future__ import annotations

import importlib

from harness import comfy_host as ch

DATA_INPUTS = {"model", "clip", "vae", "images", "captions", "class_images", "clips"}


def _settings():
    return importlib.import_module(f"{ch.pack_module_name()}.trainer.settings")


def _node_inputs() -> dict:
    types = ch.node_class("TLoRATrain").INPUT_TYPES()
    return {**types["required"], **types.get("optional", {})}, set(types["required"])


def test_every_setting_is_a_node_input_or_says_why_not(comfy_host):
    comfy_host.require_pack()
    S = _settings()
    inputs, required = _node_inputs()
    covered = set()
    for f, spec in S.specs():
        name = spec.input_name(f.name)
        if spec.no_node:
            assert name not in inputs, f"{name} has a node input and a reason not to"
            continue
        assert name in inputs, f"setting {f.name} has no node input"
        covered.add(name)
        kind, options = inputs[name][0], (inputs[name][1] if len(inputs[name]) > 1 else {})
        assert (name in required) == spec.required, name
        # Combos: a list of options (older form) or "COMBO" with options in the dict (V3 nodes).
        choices = list(kind) if isinstance(kind, (list, tuple)) else options.get("options")
        if spec.host_choices == "loras":
            assert choices[0] == "[none]" and options.get("default") == "[none]"
            continue
        if spec.options is not None:
            assert choices == list(spec.options) and options.get("default") == f.default, name
            continue
        assert options.get("default") == f.default, (name, options.get("default"), f.default)
        for bound in ("min", "max", "step"):
            if getattr(spec, bound) is not None:
                assert options.get(bound) == getattr(spec, bound), (name, bound)
    assert set(inputs) - covered == DATA_INPUTS


def test_node_defaults_give_the_default_settings(comfy_host):
    comfy_host.require_pack()
    S = _settings()
    node = importlib.import_module(f"{ch.pack_module_name()}.nodes.train_node")
    inputs, _ = _node_inputs()
    values = {k: [v[1]["default"]] for k, v in inputs.items() if k not in DATA_INPUTS and len(v) > 1}
    assert node.settings_from_inputs(values) == S.TrainSettings()
