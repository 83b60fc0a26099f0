"""The loss-vs-step chart a run returns as an image (PIL, host-free; matplotlib is optional)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def loss_curve(history: Sequence[Mapping[str, float]], width: int = 640, height: int = 360,
               title: str = "TLoRA training loss") -> Tensor:
    """A loss-vs-step chart as an IMAGE (1, H, W, 3), drawn with PIL (matplotlib is optional)."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 64, width - 16, 28, height - 36
    draw.text((left, 8), title, fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    points = [(h["step"], h["loss"]) for h in history if math.isfinite(h.get("loss", math.nan))]
    if points:
        steps = [p[0] for p in points]
        values = [p[1] for p in points]
        lo, hi = min(values), max(values)
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
        draw.text((4, top), f"{hi:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.4g}", fill="black")
        draw.text((left, bottom + 6), f"step {x0}", fill="black")
        label = f"step {x1}  final {values[-1]:.4g}"
        draw.text((right - 7 * len(label), bottom + 6), label, fill="black")
    else:
        draw.text((left + 10, (top + bottom) // 2), "no steps recorded", fill="black")
    import numpy as np
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
