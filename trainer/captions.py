"""Caption variety: shuffled tag orders and caption dropout, drawn per image per step.

With cached text-encoder outputs a caption cannot be re-encoded every step, so each caption gets
`tag_variants` orders of its comma-separated tags (the first `keep_tags` in place, as kohya's
keep_tokens), encoded once each (OneTrainer caches text variations the same way); a step draws one.
Caption dropout trains an image with the empty caption's conditioning instead.
"""
from __future__ import annotations

import hashlib

import torch

from .data import Cond, Example
from .settings import TrainSettings


def split_tags(caption: str) -> list[str]:
    """A caption's comma-separated tags, stripped, empty ones dropped."""
    return [t.strip() for t in caption.split(",") if t.strip()]


def tag_variants(caption: str, keep: int, count: int, seed: int) -> list[str]:
    """Up to `count` distinct orders of the caption's tags (the first `keep` fixed), the first being as written.

    Seeded by the run's seed and the caption, so a resume (and the disk cache) sees the same variants.
    """
    tags = split_tags(caption)
    fixed, rest = tags[:keep], tags[keep:]
    digest = hashlib.sha256(f"{seed}\0{caption}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    variants = [", ".join(tags)]
    # Enough tries to find `count` distinct orders when the tags allow that many, without looping forever.
    for _ in range(count * 8):
        if len(variants) >= count:
            break
        order = torch.randperm(len(rest), generator=generator).tolist()
        text = ", ".join(fixed + [rest[i] for i in order])
        if text not in variants:
            variants.append(text)
    return variants


def caption_choices(examples: list[Example], settings: TrainSettings) -> list[list[str]]:
    """Each example's caption variants (one, its own caption, when tags are not shuffled)."""
    if not settings.shuffle_tags:
        return [[ex.caption] for ex in examples]
    return [tag_variants(ex.caption, settings.keep_tags, settings.tag_variants, settings.seed) for ex in examples]


def draw(variants: list[int], dropout: float, generator: torch.Generator) -> list[int]:
    """Per batch item: the variant index drawn, or -1 for the empty caption (dropout)."""
    picks = []
    for count in variants:
        index = int(torch.randint(count, (1,), generator=generator)) if count > 1 else 0
        if dropout > 0 and float(torch.rand((1,), generator=generator)) < dropout:
            index = -1
        picks.append(index)
    return picks


def cond_of(example: Example, pick: int) -> Cond:
    """The cached conditioning of an example's drawn variant (pick -1: the empty caption's)."""
    if pick < 0:
        return example.dropped_cond if example.dropped_cond is not None else example.cond
    return example.variant_conds[pick] if example.variant_conds else example.cond


def caption_of(example: Example, pick: int) -> str:
    """The caption text of an example's drawn variant (pick -1: empty)."""
    if pick < 0:
        return ""
    return example.variants[pick] if example.variants else example.caption
