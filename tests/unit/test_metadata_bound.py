"""A file with more metadata entries than any adapter writes is refused by the core reader (issue 28)."""
from __future__ import annotations

import pytest

from tlora import ModuleAdapter
from tlora.errors import TLoRAFormatError
from tlora.format import MAX_METADATA_ENTRIES, load, read_metadata, save_file


def test_100000_metadata_entries_are_refused_in_one_line(tmp_path):
    """They made every card, node text and /history entry that showed them tens of megabytes long."""
    adapters = {"diffusion_model.x": ModuleAdapter.create((8, 8), "trm:2", "lora:2")}
    save_file(adapters, str(tmp_path / "many.safetensors"), metadata={f"k{i}": "v" * 300 for i in range(100_000)})
    for read in (read_metadata, load):
        with pytest.raises(TLoRAFormatError, match="100,.* metadata entries; an adapter file has a few dozen"):
            read(str(tmp_path / "many.safetensors"))
    save_file(adapters, str(tmp_path / "some.safetensors"),
              metadata={f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES - 100)})
    assert len(read_metadata(str(tmp_path / "some.safetensors"))) > MAX_METADATA_ENTRIES - 100
