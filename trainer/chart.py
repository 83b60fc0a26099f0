"""The loss-vs-step chart a run returns as an image (PIL, host-free; matplotlib is optional)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


VALIDATION_COLOUR = (220, 90, 20)


def loss_curve(history: Sequence[Mapping[str, float]], width: int = 640, height: int = 360,
               title: str = "TLoRA training loss", validation: Sequence[Mapping[str, float]] = ()) -> Tensor:
    """A loss-vs-step chart as an IMAGE (1, H, W, 3), drawn with PIL (matplotlib is optional).

    With `validation` ({step, val} points) the chart is the denoising MSE: the training images'
    (per step and its moving average) and the held-out images' (orange, dots joined), on one scale.
    """
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 64, width - 16, 28, height - 36
    draw.text((left, 8), title, fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    key = "mse" if validation else "loss"
    points = [(h["step"], h[key]) for h in history if math.isfinite(h.get(key, math.nan))]
    held = [(v["step"], v["val"]) for v in validation if math.isfinite(v.get("val", math.nan))]
    if validation:
        draw.text((right - 330, 8), "denoising MSE: training (blue), held-out (orange)", fill="black")
    if points:
        steps = [p[0] for p in points]
        values = [p[1] for p in points]
        lo, hi = min(values + [v for _, v in held]), max(values + [v for _, v in held])
        span = (hi - lo) or max(abs(hi), 1e-8)
        x0, x1 = min(steps), max(steps)
        xspan = (x1 - x0) or 1

        def xy(step: float, value: float) -> tuple[float, float]:
            return (left + (step - x0) / xspan * (right - left), bottom - (value - lo) / span * (bottom - top))
        if len(points) > 1:
            draw.line([xy(s, v) for s, v in points], fill=(150, 180, 230), width=1)
            # An EMA on top: per-step loss is noisy (random timesteps), the trend is what matters.
            ema, smooth = values[0], []
            for s, v in points:
                ema = 0.9 * ema + 0.1 * v
                smooth.append(xy(s, ema))
            draw.line(smooth, fill=(20, 60, 200), width=2)
        else:
            cx, cy = xy(*points[0])
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(20, 60, 200))
        if len(held) > 1:
            draw.line([xy(s, v) for s, v in held], fill=VALIDATION_COLOUR, width=2)
        for s, v in held:
            cx, cy = xy(s, v)
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=VALIDATION_COLOUR)
        draw.text((4, top), f"{hi:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.4g}", fill="black")
        draw.text((left, bottom + 6), f"step {x0}", fill="black")
        label = f"step {x1}  final {values[-1]:.4g}"
        draw.text((right - 7 * len(label), bottom + 6), label, fill="black")
    else:
        draw.text((left + 10, (top + bottom) // 2), "no steps recorded", fill="black")
    import numpy as np
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
