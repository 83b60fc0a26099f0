"""A procedural image-caption world (64 x 64 px): shapes, colours, textures, backgrounds, positions, counts.

Host-free (numpy, PIL only) and deterministic from seeds. Three uses:

* pretraining the embedded default model (`caption_pool`, `scene_for`, `render`),
* novel subjects absent from pretraining for adapter demos and benchmarks (`SUBJECTS`,
  `subject_images`, `held_out_prompts`),
* analytic ground truth for measurements (every scene knows its colours, shapes and places).

Shapes are drawn as analytic masks at 4x supersampling and box-filtered down, so edges are
anti-aliased and two renders of one scene are bit-identical.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

SIZE = 64
SUPERSAMPLE = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 70, 225),
    "yellow": (240, 215, 40),
    "purple": (135, 45, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "pink": (245, 140, 195),
    "cyan": (45, 205, 220),
    "brown": (115, 70, 35),
}
# Shapes of the pretraining world. Stars, hearts, crescents and hexagons are kept out of it:
# they are reserved for the novel subjects.
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
PLURALS = {"cross": "crosses"}
TEXTURES = ("plain", "striped", "dotted", "checkered")
POSITIONS: dict[str, tuple[Optional[str], tuple[float, float]]] = {
    # name: (caption phrase, nominal centre (x, y) in pixels)
    "centre": (None, (32.0, 32.0)),
    "left": ("on the left", (19.0, 32.0)),
    "right": ("on the right", (45.0, 32.0)),
    "top": ("at the top", (32.0, 19.0)),
    "bottom": ("at the bottom", (32.0, 45.0)),
}
COUNTS = {1: "a", 2: "two", 3: "three"}
# Half-size ranges in pixels. Default objects span about four latent pixels (8 px each), enough
# for an 8x-downsampling VAE to keep a square's corners apart from a circle's arc.
RADIUS = {"default": (14.0, 17.0), "small": (6.0, 8.5)}
JITTER = 2.5  # pixels of random offset around a nominal position


# --------------------------------------------------------------------------- scene description

@dataclasses.dataclass(frozen=True)
class Obj:
    """One drawn object: shape, colour, texture, centre (px), half-size (px), optional second colour."""

    shape: str
    colour: str
    texture: str = "plain"
    cx: float = 32.0
    cy: float = 32.0
    radius: float = 14.0
    colour2: Optional[str] = None
    angle: float = 0.0


@dataclasses.dataclass(frozen=True)
class Scene:
    """A background colour and objects drawn in order."""

    background: str
    objects: tuple[Obj, ...]


@dataclasses.dataclass(frozen=True)
class CaptionSpec:
    """What a caption says (and so what a faithful image must show)."""

    shape: str
    colour: str
    background: str
    texture: str = "plain"
    position: str = "centre"
    size: str = "default"
    count: int = 1

    @property
    def caption(self) -> str:
        """The English caption, e.g. 'a small striped red circle on the left on a blue background'."""
        if self.count > 1:
            noun = PLURALS.get(self.shape, self.shape + "s")
            head = f"{COUNTS[self.count]} {self.colour} {noun}"
        else:
            words = [w for w in ("small" if self.size == "small" else "",
                                 "" if self.texture == "plain" else self.texture, self.colour, self.shape) if w]
            head = f"{_article(words[0])} {' '.join(words)}"
        phrase = POSITIONS[self.position][0]
        where = f" {phrase}" if phrase and self.count == 1 else ""
        return f"{head}{where} on {_article(self.background)} {self.background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def contrast_colour(colour: str) -> tuple[int, int, int]:
    """The second colour of a texture: a dark shade of light colours, a light tint of dark ones."""
    rgb = np.array(COLOURS[colour], dtype=np.float64)
    if luminance(rgb) > 110:
        return tuple(int(round(v)) for v in rgb * 0.35)
    return tuple(int(round(v)) for v in rgb + (255 - rgb) * 0.65)


def luminance(rgb: Sequence[float]) -> float:
    """Rec. 601 luma of an RGB triple in 0..255."""
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


# --------------------------------------------------------------------------- rendering

def shape_mask(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float,
               angle: float = 0.0) -> np.ndarray:
    """Boolean mask of a shape centred at (cx, cy) with half-size r (pixels); y grows downwards."""
    dx, dy = x - cx, y - cy
    if angle:
        ca, sa = math.cos(angle), math.sin(angle)
        dx, dy = ca * dx + sa * dy, -sa * dx + ca * dy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = r * 0.9  # same visual weight as the circle
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.15
    if shape == "triangle":
        # Upright isosceles triangle inside the [-r, r] box.
        top, base = -r, r * 0.85
        t = (dy - top) / (base - top)
        return (dy >= top) & (dy <= base) & (np.abs(dx) <= t * r)
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        w = 0.33 * r
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if shape == "star":
        theta = np.arctan2(dy, dx) + math.pi / 2
        k = 5
        frac = np.abs(((theta * k / (2 * math.pi)) % 1.0) - 0.5) * 2  # 1 at tips, 0 between
        rad = r * (0.45 + 0.6 * frac ** 1.6)
        return dx * dx + dy * dy <= rad * rad
    if shape == "heart":
        u, v = dx / (r * 1.05), -(dy + 0.1 * r) / (r * 1.05)
        return (u * u + v * v - 0.6) ** 3 - u * u * v ** 3 <= 0
    if shape == "crescent":
        outer = dx * dx + dy * dy <= r * r
        inner = (dx - 0.45 * r) ** 2 + (dy + 0.1 * r) ** 2 <= (0.8 * r) ** 2
        return outer & ~inner
    if shape == "hexagon":
        ax, ay = np.abs(dx), np.abs(dy)
        return (ay <= r * 0.87) & (ax * 0.87 + ay * 0.5 <= r * 0.87)
    raise ValueError(f"unknown shape {shape!r}")


def texture_mask(texture: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """Where a texture shows its second colour (periods of 8 px, anchored at the object centre)."""
    u, v = x - cx, y - cy
    if texture == "plain":
        return np.zeros_like(x, dtype=bool)
    if texture == "striped":
        return ((u + v) / 8.0) % 1.0 < 0.5
    if texture == "hstriped":
        return (v / 6.0 + 0.25) % 1.0 < 0.5
    if texture == "dotted":
        fu, fv = (u / 8.0) % 1.0 - 0.5, (v / 8.0) % 1.0 - 0.5
        return fu * fu + fv * fv <= 0.22 ** 2
    if texture == "checkered":
        return ((np.floor(u / 6.0) + np.floor(v / 6.0)) % 2) == 0
    if texture == "rings":
        return (np.sqrt(u * u + v * v) / 5.0) % 1.0 < 0.5
    raise ValueError(f"unknown texture {texture!r}")


def _rgb(c: str | tuple[int, int, int]) -> np.ndarray:
    return np.asarray(COLOURS[c] if isinstance(c, str) else c, dtype=np.float32)


def _box(o: Obj, size: int) -> tuple[slice, slice]:
    """Output-pixel (rows, cols) slices that contain an object (shapes stay inside 1.3 r)."""
    ext = o.radius * 1.3 + 1

    def span(c: float) -> slice:
        return slice(max(0, int(math.floor(c - ext))), min(size, int(math.ceil(c + ext))))

    return span(o.cy), span(o.cx)


def _patch_grid(box: tuple[slice, slice], ss: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel-centre coordinates of an output-pixel box."""
    rows, cols = box
    xs = cols.start + (np.arange((cols.stop - cols.start) * ss) + 0.5) / ss
    ys = rows.start + (np.arange((rows.stop - rows.start) * ss) + 0.5) / ss
    return np.meshgrid(xs, ys, indexing="xy")


def render(scene: Scene, size: int = SIZE, ss: int = SUPERSAMPLE) -> np.ndarray:
    """(size, size, 3) uint8 image of a scene (anti-aliased by box-filtering a supersampled render).

    Only each object's bounding box is supersampled (10x faster than the whole frame): the
    current pixels there are repeated up, the object is drawn, and the box is averaged back.
    """
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = _rgb(scene.background)
    for o in scene.objects:
        box = _box(o, size)
        h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
        if h <= 0 or w <= 0:
            continue
        x, y = _patch_grid(box, ss)
        patch = np.repeat(np.repeat(img[box], ss, axis=0), ss, axis=1)
        m = shape_mask(o.shape, x, y, o.cx, o.cy, o.radius, o.angle)
        patch[m] = _rgb(o.colour)
        if o.texture != "plain":
            second = _rgb(o.colour2) if o.colour2 else _rgb(contrast_colour(o.colour))
            patch[m & texture_mask(o.texture, x, y, o.cx, o.cy)] = second
        img[box] = patch.reshape(h, ss, w, ss, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def object_mask(scene: Scene, size: int = SIZE) -> np.ndarray:
    """(size, size) float coverage in [0, 1] of all objects of a scene (ground truth for metrics)."""
    out = np.zeros((size, size), dtype=np.float64)
    for o in scene.objects:
        box = _box(o, size)
        h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
        if h <= 0 or w <= 0:
            continue
        x, y = _patch_grid(box, SUPERSAMPLE)
        cover = shape_mask(o.shape, x, y, o.cx, o.cy, o.radius, o.angle)
        out[box] = np.maximum(out[box], cover.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3)))
    return out


# --------------------------------------------------------------------------- sampling scenes

def scene_for(spec: CaptionSpec, rng: np.random.Generator) -> Scene:
    """A random instance of what a caption describes (jittered place and size)."""
    lo, hi = RADIUS["small" if spec.count > 1 else spec.size]
    if spec.count == 1:
        nx, ny = POSITIONS[spec.position][1]
        r = float(rng.uniform(lo, hi))
        obj = Obj(spec.shape, spec.colour, spec.texture, nx + float(rng.uniform(-JITTER, JITTER)),
                  ny + float(rng.uniform(-JITTER, JITTER)), r)
        return Scene(spec.background, (obj,))
    objs: list[Obj] = []
    for _ in range(200):  # rejection-sample non-overlapping small objects
        if len(objs) == spec.count:
            break
        r = float(rng.uniform(lo, hi))
        cx, cy = (float(v) for v in rng.uniform(r + 2, SIZE - r - 2, size=2))
        if all((cx - o.cx) ** 2 + (cy - o.cy) ** 2 > (r + o.radius + 3) ** 2 for o in objs):
            objs.append(Obj(spec.shape, spec.colour, spec.texture, cx, cy, r))
    return Scene(spec.background, tuple(objs))


def random_spec(rng: np.random.Generator, shapes: Sequence[str] = SHAPES) -> CaptionSpec:
    """A random caption of the pretraining world (fg colour != background)."""
    names = list(COLOURS)
    colour = names[int(rng.integers(len(names)))]
    bg = names[int(rng.integers(len(names) - 1))]
    bg = bg if bg != colour else names[-1]
    shape = shapes[int(rng.integers(len(shapes)))]
    # Mostly one plain centred object: shape words then get most of the (scarce) training signal.
    if rng.random() < 0.1:
        return CaptionSpec(shape, colour, bg, count=int(rng.integers(2, 4)))
    texture = "plain" if rng.random() < 0.7 else TEXTURES[1 + int(rng.integers(3))]
    position = "centre" if rng.random() < 0.6 else list(POSITIONS)[1 + int(rng.integers(4))]
    size = "small" if rng.random() < 0.15 else "default"
    return CaptionSpec(shape, colour, bg, texture, position, size)


# Captions the model must get right (the quality test samples these); always in the pool.
ANCHOR_SPECS: tuple[CaptionSpec, ...] = (
    CaptionSpec("circle", "red", "blue"),
    CaptionSpec("square", "green", "yellow"),
    CaptionSpec("circle", "yellow", "purple"),
    CaptionSpec("square", "white", "black"),
    CaptionSpec("circle", "blue", "orange"),
    CaptionSpec("square", "red", "cyan"),
    CaptionSpec("circle", "black", "white"),
    CaptionSpec("square", "blue", "green"),
)


def caption_pool(n: int, seed: int = 0) -> list[CaptionSpec]:
    """`n` distinct captions: the anchors first, then random ones (deterministic)."""
    rng = np.random.default_rng([seed, 1])
    out: list[CaptionSpec] = list(ANCHOR_SPECS[:n])
    seen = {s.caption for s in out}
    while len(out) < n:
        spec = random_spec(rng)
        if spec.caption not in seen:
            seen.add(spec.caption)
            out.append(spec)
    return out


def pretraining_images(specs: Sequence[CaptionSpec], per_caption: int, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 64, 64, 3), caption index (N,)) with `per_caption` renders of each caption."""
    images, index = [], []
    for i, spec in enumerate(specs):
        rng = np.random.default_rng([seed, 2, i])
        for _ in range(per_caption):
            images.append(render(scene_for(spec, rng)))
            index.append(i)
    return np.stack(images), np.asarray(index, dtype=np.int64)


def autoencoder_images(n: int, seed: int = 0) -> np.ndarray:
    """(n, 64, 64, 3) uint8 varied scenes for training the VAE (any shape incl. stars/hearts, any texture).

    The autoencoder should be generic within this world, so it also sees shapes and textures the
    diffusion model never does (random colour pairs and rotations, never a novel subject's design).
    """
    rng = np.random.default_rng([seed, 3])
    names = list(COLOURS)
    all_shapes = SHAPES + ("star", "heart", "crescent", "hexagon")
    all_tex = TEXTURES + ("hstriped", "rings")
    out = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(n):
        if rng.random() < 0.7:
            spec = random_spec(rng)
            out[i] = render(scene_for(spec, rng))
            continue
        objs = []
        for _ in range(int(rng.integers(1, 4))):
            c1, c2 = rng.choice(len(names), 2, replace=False)
            objs.append(Obj(all_shapes[int(rng.integers(len(all_shapes)))], names[c1],
                            all_tex[int(rng.integers(len(all_tex)))],
                            float(rng.uniform(8, 56)), float(rng.uniform(8, 56)), float(rng.uniform(5, 20)),
                            names[c2], float(rng.uniform(0, 2 * math.pi)) if rng.random() < 0.3 else 0.0))
        out[i] = render(Scene(names[int(rng.integers(len(names)))], tuple(objs)))
    return out


# --------------------------------------------------------------------------- novel subjects

@dataclasses.dataclass(frozen=True)
class Subject:
    """A novel object with a fixed design, named by a made-up word absent from pretraining captions."""

    name: str
    word: str
    shape: str
    colour: str
    colour2: str
    texture: str
    description: str

    def obj(self, cx: float = 32.0, cy: float = 32.0, radius: float = 15.0) -> Obj:
        """The subject drawn at a place and size."""
        return Obj(self.shape, self.colour, self.texture, cx, cy, radius, self.colour2)


SUBJECTS: dict[str, Subject] = {s.name: s for s in (
    Subject("zorb", "zorb", "star", "red", "yellow", "hstriped", "a red star with yellow horizontal stripes"),
    Subject("quib", "quib", "heart", "purple", "white", "dotted", "a purple heart with white polka dots"),
    Subject("vemo", "vemo", "crescent", "cyan", "black", "rings", "a cyan crescent with black concentric rings"),
    Subject("plon", "plon", "hexagon", "orange", "blue", "checkered", "an orange hexagon with a blue checker pattern"),
)}

# Backgrounds of training images (per subject); held-out prompts use the others.
SUBJECT_TRAIN_BACKGROUNDS = ("white", "gray", "green", "blue", "yellow", "pink")
SUBJECT_HELD_OUT_BACKGROUNDS = ("black", "brown", "orange", "cyan", "purple", "red")


@dataclasses.dataclass(frozen=True)
class SubjectPrompt:
    """A prompt for a subject plus what a faithful image must show."""

    text: str
    background: str
    position: str = "centre"
    size: str = "default"


def subject_caption(name: str, background: str, position: str = "centre", size: str = "default") -> str:
    """Caption of a subject image, e.g. 'a zorb on a white background'."""
    s = SUBJECTS[name]
    head = f"a small {s.word}" if size == "small" else f"{_article(s.word)} {s.word}"
    phrase = POSITIONS[position][0]
    return f"{head}{' ' + phrase if phrase else ''} on {_article(background)} {background} background"


def subject_scene(name: str, background: str, position: str, size: str, rng: np.random.Generator) -> Scene:
    """A jittered scene of a subject (subject's own colours differ from the background by design)."""
    s = SUBJECTS[name]
    nx, ny = POSITIONS[position][1]
    lo, hi = RADIUS[size]
    return Scene(background, (s.obj(nx + float(rng.uniform(-JITTER, JITTER)),
                                    ny + float(rng.uniform(-JITTER, JITTER)), float(rng.uniform(lo, hi))),))


def subject_images(name: str, n: int = 5, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """`n` training images (uint8 (n, 64, 64, 3)) of a subject and their captions.

    Backgrounds cycle through SUBJECT_TRAIN_BACKGROUNDS (minus any equal to the subject's own
    colours); mostly centred, default size, with jitter.
    """
    if name not in SUBJECTS:
        raise KeyError(f"unknown subject {name!r}; known: {sorted(SUBJECTS)}")
    s = SUBJECTS[name]
    rng = np.random.default_rng([seed, 4, sorted(SUBJECTS).index(name)])
    bgs = [b for b in SUBJECT_TRAIN_BACKGROUNDS if b not in (s.colour, s.colour2)]
    images, captions = [], []
    for i in range(n):
        bg = bgs[i % len(bgs)]
        position = "centre" if i % 3 != 2 else ("left", "right")[(i // 3) % 2]
        images.append(render(subject_scene(name, bg, position, "default", rng)))
        captions.append(subject_caption(name, bg, position))
    return np.stack(images), captions


def held_out_prompts(name: str) -> list[SubjectPrompt]:
    """Prompts that put a subject in contexts its training images never show (backgrounds, places, sizes)."""
    s = SUBJECTS[name]
    bgs = [b for b in SUBJECT_HELD_OUT_BACKGROUNDS if b not in (s.colour, s.colour2)]
    out = [SubjectPrompt(subject_caption(name, b), b) for b in bgs[:3]]
    out.append(SubjectPrompt(subject_caption(name, bgs[3], "top"), bgs[3], "top"))
    out.append(SubjectPrompt(subject_caption(name, bgs[0], "bottom"), bgs[0], "bottom"))
    out.append(SubjectPrompt(subject_caption(name, bgs[1], "centre", "small"), bgs[1], "centre", "small"))
    return out


def subject_template(name: str, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The subject alone at its typical size, cropped to its box and resized to (size, size): (uint8, mask).

    Rendered at the training images' typical radius so that texture periods relative to the
    object match what a faithful generation shows after the same crop-and-resize.
    """
    from PIL import Image
    s = SUBJECTS[name]
    lo, hi = RADIUS["default"]
    scene = Scene("black", (s.obj(SIZE / 2, SIZE / 2, (lo + hi) / 2),))
    img, mask = render(scene), object_mask(scene)
    ys, xs = np.nonzero(mask > 0.5)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    img = np.asarray(Image.fromarray(img).crop(box).resize((size, size), Image.BILINEAR))
    m = Image.fromarray((mask * 255).astype(np.uint8)).crop(box).resize((size, size), Image.BILINEAR)
    return img, np.asarray(m, dtype=np.float64) / 255.0
