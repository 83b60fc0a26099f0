"""Analytic measurements on 64 x 64 images of the procedural world (numpy only, no learned models).

What a caption promises can be checked directly: the background is the colour of the border,
the object the colour at its place, and its shape in its half-coverage outline: a square
reaches sqrt(2) times further along the diagonals than along the axes, a circle equally far.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .procedural import COLOURS, POSITIONS, CaptionSpec

_NAMES = list(COLOURS)
_TABLE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float64)

# Decision points between shape families: diagonal/axis extent ratio (square 1.41, circle 1.0,
# diamond 0.71) and the fill ratio below which a shape is neither (triangle 0.5, cross 0.55).
SQUARE_MIN_DIAGONAL = 1.09
CIRCLE_MIN_DIAGONAL = 0.85
CIRCLE_MIN_FILL = 0.62


def as_array(img: object) -> np.ndarray:
    """Any (H, W, 3) image (uint8, or float in [0, 1], numpy or torch) as float64 in 0..255."""
    a = np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img)
    a = a.astype(np.float64)
    if a.max() <= 1.0 + 1e-6 and a.dtype != np.uint8:
        a = a * 255.0
    return a[..., :3]


def nearest_colour(rgb: Sequence[float], names: Optional[Sequence[str]] = None) -> str:
    """Name of the palette colour nearest to an RGB triple (0..255), optionally among `names`."""
    names = list(names) if names is not None else _NAMES
    table = np.array([COLOURS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((table - np.asarray(rgb, dtype=np.float64)) ** 2).sum(1)))]


def border_rgb(img: object, width: int = 3) -> np.ndarray:
    """Median colour of the outer `width`-pixel frame (where objects rarely reach)."""
    a = as_array(img)
    frame = np.concatenate([a[:width].reshape(-1, 3), a[-width:].reshape(-1, 3),
                            a[:, :width].reshape(-1, 3), a[:, -width:].reshape(-1, 3)])
    return np.median(frame, axis=0)


def background_colour(img: object) -> str:
    """The palette name of the image's background (its border's median colour)."""
    return nearest_colour(border_rgb(img))


def foreground_mask(img: object, background: Optional[Sequence[float]] = None, threshold: float = 70.0
                    ) -> np.ndarray:
    """Pixels farther than `threshold` (RGB distance) from the background colour."""
    a = as_array(img)
    bg = border_rgb(a) if background is None else np.asarray(background, dtype=np.float64)
    return np.linalg.norm(a - bg, axis=-1) > threshold


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (iterative flood fill)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for sy, sx in zip(*np.nonzero(mask)):
        if labels[sy, sx]:
            continue
        current += 1
        stack, size = [(sy, sx)], 0
        labels[sy, sx] = current
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def fill_ratio(mask: np.ndarray) -> float:
    """Object area / bounding-box area of a mask (0 for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return 0.0
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return float(mask.sum() / box)


def diagonal_ratio(mask: np.ndarray) -> float:
    """Mean extent along the two diagonals over mean extent along the axes (square 1.41, circle 1, diamond 0.71).

    Extents are measured through pixel centres (+1 pixel), so quantisation barely matters and a
    square with softened corners still stands well apart from a circle.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return 0.0

    def extent(v: np.ndarray) -> float:
        return float(v.max() - v.min())

    axes = (extent(xs) + extent(ys)) / 2 + 1
    diag = (extent(xs + ys) + extent(xs - ys)) / (2 * np.sqrt(2)) + 1
    return diag / axes


def shape_family(mask: np.ndarray) -> str:
    """'square', 'circle' or 'other' (triangles, diamonds, crosses, rings, blobs with holes...).

    Squares reach further along the diagonals than along the axes, circles equally far; both
    fill most of their box (thresholds sit between ground-truth renders and VAE round trips).
    """
    if fill_ratio(mask) < CIRCLE_MIN_FILL:
        return "other"
    r = diagonal_ratio(mask)
    if r >= SQUARE_MIN_DIAGONAL:
        return "square"
    if r >= CIRCLE_MIN_DIAGONAL:
        return "circle"
    return "other"


def centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) centre of mass of a mask in pixel units (pixel centres at +0.5); image centre if empty."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return (mask.shape[1] / 2, mask.shape[0] / 2)
    return (float(xs.mean() + 0.5), float(ys.mean() + 0.5))


def object_rgb(img: object, mask: np.ndarray) -> np.ndarray:
    """Median colour inside an object mask (eroded by one pixel so anti-aliased edges do not count)."""
    a = as_array(img)
    core = mask.copy()
    core[1:] &= mask[:-1]
    core[:-1] &= mask[1:]
    core[:, 1:] &= mask[:, :-1]
    core[:, :-1] &= mask[:, 1:]
    use = core if core.sum() >= 4 else mask
    if use.sum() == 0:
        return np.median(a.reshape(-1, 3), axis=0)
    return np.median(a[use], axis=0)


def position_of(mask: np.ndarray) -> str:
    """The named position (centre/left/right/top/bottom) nearest to an object's centroid."""
    cx, cy = centroid(mask)
    return min(POSITIONS, key=lambda p: (POSITIONS[p][1][0] - cx) ** 2 + (POSITIONS[p][1][1] - cy) ** 2)


def coverage_mask(img: object, background: Sequence[float], colour: Sequence[float]) -> np.ndarray:
    """Pixels at least half covered by a flat-coloured object (projection between background and object colour).

    The half-coverage contour does not depend on a distance threshold or on how soft the edges
    are, so a circle fills pi/4 of its box whether it is crisp or blurred.
    """
    a = as_array(img)
    bg, fg = np.asarray(background, dtype=np.float64), np.asarray(colour, dtype=np.float64)
    d = fg - bg
    alpha = ((a - bg) @ d) / max(float(d @ d), 1e-6)
    return alpha > 0.5


def analyse(img: object) -> dict:
    """Everything measurable about a one-object image: colours, object mask stats, shape, position."""
    a = as_array(img)
    bg = border_rgb(a)
    rough = largest_component(foreground_mask(a, bg))
    obj = object_rgb(a, rough)
    fg = largest_component(coverage_mask(a, bg, obj)) if rough.any() else rough
    return {
        "background": nearest_colour(bg), "background_rgb": bg.tolist(),
        "object": nearest_colour(obj) if rough.any() else None,
        "object_rgb": obj.tolist(), "area": int(fg.sum()), "fill": fill_ratio(fg),
        "shape": shape_family(fg) if fg.any() else None, "position": position_of(fg) if fg.any() else None,
        "centroid": centroid(fg),
    }


def check_caption(img: object, spec: CaptionSpec) -> dict[str, bool]:
    """Whether an image shows what a one-object plain caption says (background, colour, shape, place)."""
    info = analyse(img)
    out = {"background": info["background"] == spec.background,
           "colour": info["object"] == spec.colour,
           "position": info["position"] == spec.position}
    if spec.shape in ("circle", "square"):
        out["shape"] = info["shape"] == spec.shape
    return out


# --------------------------------------------------------------------------- subjects (benchmarks)

def _crop_resize(a: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop an image and its mask to the mask's bounding box and resize both to (size, size)."""
    from PIL import Image
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = Image.fromarray(np.clip(a[y0:y1, x0:x1], 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    m = Image.fromarray((mask[y0:y1, x0:x1] * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(crop, dtype=np.float64), np.asarray(m, dtype=np.float64) / 255.0


def subject_fidelity(img: object, name: str, size: int = 32) -> dict[str, float]:
    """How much a generated object looks like a novel subject, from its analytic template (0..1 each).

    shape: IoU of the object's silhouette (cropped to its box, resized) with the template's;
    palette: share of object pixels whose nearest palette colour is one of the subject's two
    colours; pattern: correlation of where the second colour sits (stripes, dots, rings,
    checks) with the template, clipped at 0; score: mean of the three. No learned model.
    """
    from .procedural import SUBJECTS, subject_template
    s = SUBJECTS[name]
    a = as_array(img)
    mask = largest_component(foreground_mask(a))
    if mask.sum() < 9:
        return {"shape": 0.0, "palette": 0.0, "pattern": 0.0, "score": 0.0}
    crop, cmask = _crop_resize(a, mask, size)
    tmpl, tmask = subject_template(name, size)
    inside, tin = cmask > 0.5, tmask > 0.5
    shape = float((inside & tin).sum() / max(1, (inside | tin).sum()))
    c1, c2 = np.asarray(COLOURS[s.colour], dtype=np.float64), np.asarray(COLOURS[s.colour2], dtype=np.float64)
    pix = crop[inside]
    nearest = np.argmin(((pix[:, None, :] - _TABLE[None]) ** 2).sum(-1), axis=1)
    own = {_NAMES.index(s.colour), _NAMES.index(s.colour2)}
    palette = float(np.isin(nearest, list(own)).mean()) if len(pix) else 0.0

    def second(x: np.ndarray) -> np.ndarray:
        # 1 where a pixel is nearer the second colour than the first, soft in between.
        d1, d2 = np.linalg.norm(x - c1, axis=-1), np.linalg.norm(x - c2, axis=-1)
        return d1 / np.maximum(d1 + d2, 1e-6)

    both = inside & tin
    if both.sum() >= 9:
        u, v = second(crop)[both], second(tmpl.astype(np.float64))[both]
        corr = float(np.corrcoef(u, v)[0, 1]) if u.std() > 1e-6 and v.std() > 1e-6 else 0.0
    else:
        corr = 0.0
    pattern = max(0.0, corr)
    return {"shape": shape, "palette": palette, "pattern": pattern, "score": (shape + palette + pattern) / 3}


def placement(img: object) -> dict:
    """Background colour, object centroid position and area of the main object (any colours)."""
    a = as_array(img)
    mask = largest_component(foreground_mask(a))
    return {"background": background_colour(a), "position": position_of(mask) if mask.any() else None,
            "area": int(mask.sum())}


def mean_pairwise_distance(images: Sequence[object]) -> float:
    """Mean RMS pixel distance (0..1) over all pairs: a diversity measure (0 = identical images)."""
    arrs = [as_array(im) / 255.0 for im in images]
    if len(arrs) < 2:
        return 0.0
    d = [float(np.sqrt(((arrs[i] - arrs[j]) ** 2).mean())) for i in range(len(arrs)) for j in range(i + 1, len(arrs))]
    return float(np.mean(d))


def nearest_distance(img: object, references: Sequence[object]) -> float:
    """RMS pixel distance (0..1) to the closest reference image (small = a near copy of a training image)."""
    a = as_array(img) / 255.0
    return float(min(np.sqrt(((a - as_array(r) / 255.0) ** 2).mean()) for r in references))


def object_crop(img: object, size: int = 32, min_area: int = 9) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The main object (largest region unlike the border) cropped to its box and resized: (rgb, mask).

    None when that region has fewer than `min_area` pixels (no object).
    """
    a = as_array(img)
    mask = largest_component(foreground_mask(a))
    if mask.sum() < max(1, min_area):
        return None
    return _crop_resize(a, mask, size)


def crop_similarity(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """1 - mean absolute RGB difference (0..1) over the union of two object crops' silhouettes.

    Pixels inside one silhouette but outside the other compare object against background, so
    shape, colour and pattern all count; 1 means the same object.
    """
    (ca, ma), (cb, mb) = a, b
    union = (ma > 0.5) | (mb > 0.5)
    if not union.any():
        return 0.0
    return float(1.0 - (np.abs(ca - cb)[union]).mean() / 255.0)


def subject_similarity(img: object, references: Sequence[tuple[np.ndarray, np.ndarray]], min_area: int = 9
                       ) -> float:
    """Best crop similarity of an image's main object to reference object crops (0 if no object).

    With references taken from the subject's training images after a round trip through the
    model's own VAE, this is template matching against what the model can render at best.
    Objects smaller than `min_area` pixels count as no object (a speck is not a rendering).
    """
    crop = object_crop(img, min_area=min_area)
    if crop is None or not references:
        return 0.0
    return max(crop_similarity(crop, r) for r in references)


def recognise_subject(img: object, references: dict[str, Sequence[tuple[np.ndarray, np.ndarray]]],
                      min_area: int = 9) -> Optional[str]:
    """Which subject an image's main object resembles most (best crop similarity over each subject's references).

    None when there is no object. With every subject's VAE round-trip crops as references this
    is a nearest-neighbour classifier over the subjects: an image "shows the quib" when its
    object is closer to some quib reference than to any reference of the other subjects.
    """
    crop = object_crop(img, min_area=min_area)
    if crop is None:
        return None
    best = {name: max((crop_similarity(crop, r) for r in refs), default=-1.0) for name, refs in references.items()}
    return max(best, key=best.get)
