"""The procedural world (proving/procedural.py) and its analytic measurements (proving/measure.py)."""
from __future__ import annotations

import numpy as np
import pytest

from proving import measure as M
from proving import procedural as P


def test_render_is_deterministic_and_uint8() -> None:
    specs = P.caption_pool(20, seed=3)
    a, ia = P.pretraining_images(specs, 2, seed=3)
    b, ib = P.pretraining_images(specs, 2, seed=3)
    assert a.dtype == np.uint8 and a.shape == (40, 64, 64, 3)
    assert np.array_equal(a, b) and np.array_equal(ia, ib)
    c, _ = P.pretraining_images(specs, 2, seed=4)
    assert not np.array_equal(a, c)


def test_caption_pool_distinct_anchors_first_and_grammar() -> None:
    pool = P.caption_pool(150, seed=0)
    texts = [s.caption for s in pool]
    assert len(set(texts)) == 150
    assert texts[0] == "a red circle on a blue background"
    assert all(s.colour != s.background for s in pool)
    assert P.CaptionSpec("circle", "orange", "orange").caption.startswith("an orange circle on an orange")
    assert P.CaptionSpec("cross", "red", "blue", count=2).caption == "two red crosses on a blue background"
    small = P.CaptionSpec("square", "red", "blue", "striped", "left", "small").caption
    assert small == "a small striped red square on the left on a blue background"
    # Shapes reserved for novel subjects never appear in pretraining captions.
    reserved = {s.shape for s in P.SUBJECTS.values()} | {s.word for s in P.SUBJECTS.values()}
    assert not any(word in text.split() for text in texts for word in reserved)


@pytest.mark.parametrize("shape", P.SHAPES + ("star", "heart", "crescent", "hexagon"))
def test_every_shape_draws_inside_its_box(shape: str) -> None:
    scene = P.Scene("black", (P.Obj(shape, "white", cx=32, cy=32, radius=14),))
    img = P.render(scene)
    mask = P.object_mask(scene)
    assert 50 < (mask > 0.5).sum() < 64 * 64 * 0.4
    assert (img[mask > 0.99] == P.COLOURS["white"]).all()
    assert (img[0] == P.COLOURS["black"]).all()


def test_measurements_on_ground_truth() -> None:
    rng = np.random.default_rng(0)
    checked = 0
    for spec in P.caption_pool(200, seed=1):
        if spec.count > 1 or spec.texture != "plain":
            continue
        result = M.check_caption(P.render(P.scene_for(spec, rng)), spec)
        assert all(result.values()), (spec.caption, result)
        checked += 1
    assert checked > 80


def test_shape_family_separates_circles_and_squares() -> None:
    for shape, expect in (("circle", "square"), ("square", "circle")):
        img = P.render(P.Scene("blue", (P.Obj(shape, "red", radius=14),)))
        info = M.analyse(img)
        assert info["shape"] == shape != expect
        assert info["background"] == "blue" and info["object"] == "red" and info["position"] == "centre"


def test_subjects_images_and_held_out_prompts() -> None:
    for name, subject in P.SUBJECTS.items():
        images, captions = P.subject_images(name, 5, seed=0)
        assert images.shape == (5, 64, 64, 3) and len(captions) == 5
        assert all(subject.word in c for c in captions)
        again, _ = P.subject_images(name, 5, seed=0)
        assert np.array_equal(images, again)
        train_bgs = {M.background_colour(im) for im in images}
        held = P.held_out_prompts(name)
        assert len(held) >= 5
        assert all(p.background not in train_bgs for p in held)
        assert all(p.background not in (subject.colour, subject.colour2) for p in held)
        assert {p.text for p in held}.isdisjoint(captions)
        template, mask = P.subject_template(name, 32)
        assert template.shape == (32, 32, 3) and mask.shape == (32, 32) and 0.2 < mask.mean() < 0.9


def test_unknown_subject_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="known"):
        P.subject_images("nope")


def test_subject_metrics_prefer_the_subject_over_others() -> None:
    for name in P.SUBJECTS:
        images, _ = P.subject_images(name, 5, seed=0)
        refs = [M.object_crop(im) for im in images]
        rng = np.random.default_rng(7)
        held = [P.render(P.subject_scene(name, p.background, p.position, p.size, rng))
                for p in P.held_out_prompts(name) if p.size == "default"]
        others = [im for n in P.SUBJECTS if n != name for im in P.subject_images(n, 2, seed=1)[0]]
        own = np.mean([M.subject_similarity(im, refs) for im in held])
        other = np.mean([M.subject_similarity(im, refs) for im in others])
        assert own > 0.85 and own > other + 0.15, (name, own, other)
        tmpl_own = np.mean([M.subject_fidelity(im, name)["score"] for im in images])
        tmpl_other = np.mean([M.subject_fidelity(im, name)["score"] for im in others])
        assert tmpl_own > tmpl_other + 0.3, (name, tmpl_own, tmpl_other)


def test_diversity_and_nearest_distance() -> None:
    images, _ = P.subject_images("quib", 4, seed=0)
    assert M.mean_pairwise_distance([images[0], images[0]]) == 0.0
    assert M.mean_pairwise_distance(images) > 0.05
    assert M.nearest_distance(images[1], images) == 0.0


def test_recognise_subject_among_all_subjects_and_min_area() -> None:
    refs = {n: [M.object_crop(im) for im in P.subject_images(n, 5, seed=0)[0]] for n in P.SUBJECTS}
    for name in P.SUBJECTS:
        for im in P.subject_images(name, 3, seed=5)[0]:
            assert M.recognise_subject(im, refs) == name
    blank = np.full((64, 64, 3), 128, dtype=np.uint8)
    assert M.recognise_subject(blank, refs) is None and M.subject_similarity(blank, refs["quib"]) == 0.0
    speck = blank.copy()
    speck[30:34, 30:34] = P.COLOURS["purple"]  # 16 pixels: an object by default, a speck with min_area=40
    assert M.subject_similarity(speck, refs["quib"]) > 0.0
    assert M.subject_similarity(speck, refs["quib"], min_area=40) == 0.0
    assert M.recognise_subject(speck, refs, min_area=40) is None
