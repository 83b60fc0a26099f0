"""trainer.settings: the one settings object (defaults, casting, validation, metadata, file config)."""
from __future__ import annotations

import dataclasses

import pytest

from harness.pack import pack_module

S = pack_module("trainer.settings")


def test_every_setting_has_a_spec_with_help_and_a_node_input_or_a_reason():
    for f, spec in S.specs():
        assert spec.help.strip(), f.name
        assert spec.no_node is None or len(spec.no_node) > 10, f.name
        if spec.options is not None:
            assert f.default in spec.options, f.name
        values = f.default if isinstance(f.default, tuple) else (f.default,)
        if spec.min is not None:
            assert all(v >= spec.min for v in values), f.name
        if spec.max is not None:
            assert all(v <= spec.max for v in values), f.name
        assert S._value_problem(f.default, f.default, spec) is None, f.name


def test_node_and_engine_defaults_are_one_set():
    """The copies used to disagree (loss mse in the engine, dco on the node): now there is one."""
    s = S.TrainSettings()
    assert (s.loss, s.steps, s.learning_rate, s.save_every, s.precision) == ("dco", 500, 1e-4, 250, "auto")


def test_from_values_casts_and_refuses_unknown_names():
    s = S.from_values({"steps": 7.0, "learning_rate": 1, "gradient_checkpointing": 1, "grad_accumulation": 3,
                       "sample_prompt": None}, by_input_name=True)
    assert s.steps == 7 and isinstance(s.steps, int) and s.learning_rate == 1.0 and isinstance(s.learning_rate, float)
    assert s.gradient_checkpointing is True and s.grad_accum == 3 and s.sample_prompt == ""
    with pytest.raises(S.TrainingError, match="unknown training setting.*stepz"):
        S.from_values({"stepz": 3})
    with pytest.raises(S.TrainingError, match="grad_accumulation"):
        S.from_values({"grad_accumulation": 3})  # the node's name is not the field's name


def test_metadata_forms_are_the_files_forms():
    s = S.TrainSettings(learning_rate=3e-3, resolution=64, with_convs=True, aspect_buckets=True, loss="mse",
                        class_prompt="")
    meta = s.metadata()
    assert meta["tlora.train.lr"] == meta["ss_learning_rate"] == "0.003"
    assert meta["tlora.train.resolution"] == "64" and meta["ss_resolution"] == "(64, 64)"
    assert meta["tlora.train.targets"] == "attn+convs" and meta["tlora.train.aspect_buckets"] == "true"
    assert meta["tlora.train.total_steps"] == "500" and meta["tlora.train.seed"] == meta["ss_seed"] == "0"
    assert "tlora.train.dco_beta" not in meta and "tlora.train.class_prompt" not in meta
    dco = S.TrainSettings(loss="dco", dco_beta=250.0, class_prompt="a dog").metadata()
    assert dco["tlora.train.dco_beta"] == "250.0" and dco["tlora.train.class_prompt"] == "a dog"


def test_file_config_names_what_was_asked():
    cfg = S.TrainSettings(transform="trm:3", residual="lora:4", targets="attn-ff", train_text_encoder=True).file_config()
    assert cfg == {"transform": "trm:3", "residual": "lora:4", "targets": "attn-ff", "shapes": "paper",
                   "with_convs": False, "text_encoder": True}


@pytest.mark.parametrize("changes, word", [({"loss": "l1"}, "loss"), ({"steps": 0}, "steps"),
                                           ({"precision": "fp8"}, "precision"), ({"grad_accum": 0}, "accumulation")])
def test_validation_names_the_setting(changes, word):
    with pytest.raises(S.TrainingError, match=word):
        S.TrainSettings(**changes).validate()


def test_settings_are_frozen_and_replace_copies():
    s = S.TrainSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 3  # type: ignore[misc]
    assert s.replace(steps=3).steps == 3 and s.steps == 500


def test_derived_seeds_stay_in_torchs_range_at_the_nodes_maximum():
    import torch
    top = S.MAX_SEED
    assert S.derived_seed(top, 1) == 0 and S.derived_seed(5, 1) == 6
    torch.Generator().manual_seed(S.derived_seed(top, 104729))  # no "Overflow when unpacking long long"


# The values the hostile rounds gave the command line and the node: each is refused, naming the setting.
BAD_VALUES = [
    ({"resolution": 0}, "resolution must be at least 64"), ({"resolution": -64}, "resolution must be at least 64"),
    ({"resolution": 8}, "resolution must be at least 64"), ({"resolution": 100}, "resolution must be a multiple of 64"),
    ({"seed": 2 ** 64}, "seed must be at most 18446744073709551615"),
    ({"weight_decay": float("nan")}, "weight_decay must be a finite number"),
    ({"adam_betas": (1.0, 1.0)}, "adam_betas must be at most"),
    ({"transform": "trm:100000"}, "transform trm:100000 asks for rank 100000"),
    ({"residual": "lora:100000"}, "residual lora:100000 asks for rank 100000"),
    ({"sample_steps": 0}, "sample_steps must be at least 1"),
    ({"num_class_images": -3}, "num_class_images must be at least 0"),
    ({"sample_cfg": float("nan")}, "sample_cfg must be a finite number"),
    ({"dco_beta": float("nan")}, "dco_beta must be a finite number"),
    ({"prior_loss_weight": float("nan")}, "prior_loss_weight must be a finite number"),
    ({"learning_rate": float("inf")}, "learning_rate must be a finite number"),
    ({"learning_rate": 1e30}, "learning_rate must be at most 1"),
    ({"max_grad_norm": float("nan")}, "max_grad_norm must be a finite number"),
    ({"max_grad_norm": 0.0}, "max_grad_norm must be at least"),
    ({"form": "fastest"}, "form must be one of auto, factored, merged, dense"),
    ({"transform": "none", "residual": "none"}, "both none"),
    ({"transform": "trm:x"}, "transform: transform 'trm:x' needs an integer rank"),
]


@pytest.mark.parametrize("changes, message", BAD_VALUES, ids=[str(c) for c, _ in BAD_VALUES])
def test_every_setting_is_checked_against_its_range_once_for_every_host(changes, message):
    with pytest.raises(S.TrainingError, match=message.replace("(", r"\(")):
        S.TrainSettings(**changes).validate()
    with pytest.raises(S.TrainingError, match="^--"):  # a host names its own inputs (the command line's flags)
        S.TrainSettings(**changes).validate(label=lambda n: "--" + n.replace("_", "-"))


def test_the_sizes_are_counted_from_the_layout():
    """trm:2 + tr:6 on a 320x320 weight (the paper's shapes: 320 = 4 x 8 x 10): cores counted by hand."""
    transform = (4 * 4 + 8 * 8 + 10 * 10) * 2 * 2
    residual = 2 * (4 + 8 + 10) * 6 * 6
    assert S.adapter_params([(320, 320)], "trm:2", "tr:6") == transform + residual + 1  # + the scale
