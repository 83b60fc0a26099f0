"""Preview prompts: one a line, each with kohya-style flags for its own size, steps, guidance, seed, negative.

    a photo of sks dog on a beach --w 768 --h 512 --s 30 --l 6 --d 7 --n blurry

--w/--h width and height in pixels (multiples of 64; default the training resolution), --s sampler
steps (default sample_steps), --l guidance (default sample_cfg), --d seed (default: the run's preview
seed), --n negative prompt (default empty). An empty text is one preview of the instance prompt.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..tlora.errors import TLoRAError

_FLAG = re.compile(r"(?:^|\s)--([A-Za-z]+)(?=\s|$)")
MAX_PREVIEWS = 16


@dataclass(frozen=True)
class PreviewPrompt:
    """One preview: prompt, negative, size in pixels, steps, guidance, seed (None: the run's)."""

    prompt: str
    negative: str
    width: int
    height: int
    steps: int
    cfg: float
    seed: int | None = None


def _number(flag: str, text: str, line: int, kind: type, low: float, high: float) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise TLoRAError(f"preview line {line}: --{flag} needs a number (got {text!r})") from None
    if not (low <= value <= high):
        raise TLoRAError(f"preview line {line}: --{flag} must be between {low:g} and {high:g} (got {text})")
    return value


def parse_previews(text: str, default_prompt: str, resolution: int, steps: int, cfg: float) -> list[PreviewPrompt]:
    """The preview prompts a setting's text asks for (TLoRAError naming the line for a bad flag)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()] or [default_prompt]
    if len(lines) > MAX_PREVIEWS:
        raise TLoRAError(f"{len(lines)} preview prompts: at most {MAX_PREVIEWS} (each is sampled at every preview)")
    out = []
    for number, line in enumerate(lines, 1):
        parts = _FLAG.split(line)
        prompt, values = parts[0].strip(), dict(zip(parts[1::2], (v.strip() for v in parts[2::2])))
        unknown = sorted(set(values) - {"w", "h", "s", "l", "d", "n"})
        if unknown:
            raise TLoRAError(f"preview line {number}: unknown flag --{unknown[0]} (flags: --w --h --s --l --d --n)")
        size = {}
        for flag in ("w", "h"):
            value = int(_number(flag, values[flag], number, int, 64, 4096)) if flag in values else resolution
            if value % 64:
                raise TLoRAError(f"preview line {number}: --{flag} must be a multiple of 64 (got {value})")
            size[flag] = value
        out.append(PreviewPrompt(
            prompt or default_prompt, values.get("n", ""), size["w"], size["h"],
            int(_number("s", values["s"], number, int, 1, 1000)) if "s" in values else steps,
            float(_number("l", values["l"], number, float, 0, 100)) if "l" in values else cfg,
            int(_number("d", values["d"], number, int, 0, 2 ** 63 - 1)) if "d" in values else None))
    return out
