"""Claiming a module's keys in a file and refusing a file whole: the one owner for every host.

A host offers its loader a file's tensors and a module name (a prefix); `claim` answers with the
validated adapter and the keys it used, or None when the module has no TLoRA there. A file whose
modules do not all fit is refused whole with one line from `refusal`: ComfyUI's loaders, the
diffusers inference binding and the webuis all word it the same way, and none half-applies a file.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping

from .adapter import SUFFIX_PATTERN, ModuleAdapter
from .errors import TLoRAError
from .format import SUFFIX_MARK, check_one_adapter_per_weight, has_tlora_module

# Why a module did not fit (the start of a `refusal` problem; the rest is free text).
MISSING = "no such module in this model"
OVERLAP = "patches the same rows of"
UNFIT = "cannot carry a TLoRA"  # the name reaches a layer of another kind (or inside another adapter's layer)


def broken(err: Exception) -> TLoRAError:
    """The one-line error for a file whose own content is wrong (whatever loader found it)."""
    return TLoRAError(f"broken TLoRA file: {err}; nothing of it was applied")


def claim(prefix: str, tensors: Mapping) -> tuple[ModuleAdapter, set[str]] | None:
    """The validated adapter of module `prefix` and the keys it used; None when absent; TLoRAError if broken.

    A few dict lookups answer "not mine" (hosts offer every key-map entry, thousands, to every
    adapter kind). The module's weight must not be given again under another name or by another
    adapter kind: a host keeps one patch per weight and would lose a half without a word.
    """
    if not has_tlora_module(prefix, tensors):
        return None
    head = prefix + "."
    mine = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head) and SUFFIX_PATTERN.match(k[len(head):])}
    try:
        check_one_adapter_per_weight(prefix, tensors)
        adapter = ModuleAdapter(mine, name=prefix)
    except TLoRAError as err:
        raise broken(err) from None
    return adapter, {head + s for s in mine}


def module_prefixes(keys: Collection[str]) -> list[str]:
    """The TLoRA modules a file's keys name (sorted)."""
    return sorted({k[:k.rfind(SUFFIX_MARK)] for k in keys if k.rfind(SUFFIX_MARK) > 0})


def refusal(label: str, total: int, problems: Mapping[str, str], target: str, made_for: str | None = None) -> str:
    """One line: how many of a file's modules did not fit this target, grouped by why, an example of each."""
    missing = [p for p, why in problems.items() if why.startswith(MISSING)]
    twice = [p for p, why in problems.items() if why.startswith(OVERLAP)]
    unfit = [p for p, why in problems.items() if why.startswith(UNFIT)]
    misfit = [p for p in problems if p not in missing and p not in twice and p not in unfit]
    parts = []
    if missing:
        parts.append(f"{len(missing)} not in this {target}, e.g. {missing[0]}")
    if twice:
        parts.append(f"{len(twice)} given twice, e.g. {twice[0]} {problems[twice[0]]} (TLoRA patches of one "
                     f"weight do not commute: give each weight once)")
    if unfit:
        parts.append(f"{len(unfit)} naming no adaptable layer, e.g. {unfit[0]}: {problems[unfit[0]][len(UNFIT) + 2:]}")
    if misfit:
        parts.append(f"{len(misfit)} with other shapes, e.g. {misfit[0]}: {problems[misfit[0]]}")
    hint = "" if not made_for or made_for.startswith("unknown") else f" The file was made for {made_for}."
    return (f"TLoRA {label!r} does not fit this {target}: {len(problems)} of {total} modules did "
            f"not match ({'; '.join(parts)}).{hint} Nothing was applied.")
