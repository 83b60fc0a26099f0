"""`make demo`'s training path (tools/demo.py) against the session's real ComfyUI server.

The demo itself runs on the embedded default model (a 20-minute build); here the same functions
run on the tiny harness checkpoint with a couple of training steps: the training workflow
example_workflows/tlora_train_subject.json converts, validates and runs over HTTP with the
images loaded by ComfyUI's own dataset node, the trained file lands in models/loras, and the
before/after sampling, measurements, grid and summary are produced.
"""
from __future__ import annotations

import json
import math

import pytest

from tests.host.test_server_loader import demo_module
from tests.support.fixtures import HARNESS_CKPT_NAME

SUBJECT = "quib"


@pytest.fixture(scope="module")
def subject_pictures(comfy_server):
    """Five procedural images of the subject with captions in the server's input/<subject>/ folder."""
    return demo_module().write_subject_images(SUBJECT, comfy_server.base_dir / "input" / SUBJECT, n=5)


def test_subject_images_and_captions_are_written(subject_pictures):
    assert len(subject_pictures) == 5
    for png, caption in subject_pictures:
        assert png.is_file() and png.with_suffix(".txt").read_text().strip() == caption
        assert SUBJECT in caption


def test_train_workflow_converts_with_the_servers_nodes(comfy_server, subject_pictures):
    demo = demo_module()
    graph = demo.ui_to_api(demo.load_workflow(demo.TRAIN_WORKFLOW), comfy_server.object_info())
    kinds = {n["class_type"] for n in graph.values()}
    assert {"CheckpointLoaderSimple", "LoadImageTextDataSetFromFolder", "TLoRATrain", "SaveImage", "KSampler"} <= kinds
    train = demo.nodes_of(graph, "TLoRATrain")[0]["inputs"]
    data_id = next(k for k, n in graph.items() if n["class_type"] == "LoadImageTextDataSetFromFolder")
    assert train["images"] == [data_id, 0] and train["captions"] == [data_id, 1]  # ComfyUI's loader feeds both
    assert SUBJECT in train["instance_prompt"] and train["sample_every"] == 0 and train["resolution"] == 64
    saves = {n["inputs"]["filename_prefix"] for n in demo.nodes_of(graph, "SaveImage")}
    assert saves == {"tlora_train/loss_curve", "tlora_train/trained_sample"}


def test_demo_training_path_on_the_tiny_checkpoint(comfy_server, subject_pictures, tmp_path):
    demo = demo_module()
    from proving.procedural import held_out_prompts
    object_info = comfy_server.object_info()
    captions = [c for _, c in subject_pictures]
    trained = demo.run_training(comfy_server, object_info, HARNESS_CKPT_NAME, SUBJECT, captions, tmp_path,
                                steps=3, lr=1e-3, loss="mse", batch=2, output_name="test_demo_quib", timeout=600)
    assert trained["file"].parent == comfy_server.loras_dir and trained["file"].name == "test_demo_quib.safetensors"
    assert (tmp_path / "test_demo_quib.safetensors").is_file() and (tmp_path / "loss_curve.png").is_file()
    assert len(trained["losses"]) == 3 and all(math.isfinite(v) for v in trained["losses"])
    stats = demo.loss_stats(trained["file"])
    assert stats["params"] > 0 and stats["transform"] == "trm:2" and stats["residual"] == "tr:6"
    assert stats["resolution"] == "64" and stats["final_loss"] is not None
    api = json.loads((tmp_path / "workflow_train_api.json").read_text())
    assert demo.nodes_of(api, "TLoRATrain")[0]["inputs"]["steps"] == 3

    refs = demo.vae_round_trip(comfy_server, HARNESS_CKPT_NAME, SUBJECT)
    assert len(refs) == 5
    prompts = held_out_prompts(SUBJECT)[:2]
    images = demo.sample_before_after(comfy_server, object_info, HARNESS_CKPT_NAME, trained["file"].name,
                                      [p.text for p in prompts], seed=1, batch=2)
    assert set(images) == {(p.text, s) for p in prompts for s in (0.0, 1.0)}
    assert all(len(v) == 2 for v in images.values())
    scores = demo.measure(images, refs, SUBJECT, prompts)
    for s in ("0", "1"):
        assert set(scores["overall"][s]) == {"similarity", "template", "background"}
        assert all(0.0 <= v <= 1.0 for v in scores["overall"][s].values())
    grid = demo.before_after_grid([p for p, _ in subject_pictures], images, prompts, scores,
                                  tmp_path / "before_after.png", "test")
    from PIL import Image
    assert Image.open(grid).size[0] > 4 * 128
