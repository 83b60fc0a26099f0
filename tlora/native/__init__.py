"""Optional compiled CPU kernels: the factored transform chain (`chain.c`, `kernels.h`) and the
tensor-ring residual's chain products (`ring.c`).

On CPU the factored form's small contractions run far below a GEMM's speed when each is a
separate BLAS call (docs/BENCHMARKS.md); `chain.c` runs the whole chain on a few tokens at
a time so its intermediates stay in cache, and splits the tokens over threads. It is plain C, built at first use with the
system's C compiler (``$CC``, else ``cc``/``gcc``/``clang``) into a per-user cache
(``$TLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/tlora`` or ``~/.cache/tlora``), one library per
source, compiler and CPU, written atomically. Without a compiler (or with
``TLORA_NATIVE=0``) everything runs on the pure-torch engine: same results, slower on CPU.
`status()` says which, and why.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("chain.c")
# Compiled together into one library; the header is part of what the cached build depends on.
SOURCES = (SOURCE, SOURCE.with_name("ring.c"))
HEADERS = (SOURCE.with_name("kernels.h"),)
ENV_NATIVE = "TLORA_NATIVE"
ENV_CACHE = "TLORA_CACHE_DIR"
COMPILE_TIMEOUT_S = 180
MAX_CORES = 16  # as chain.c
_FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-march=native", "-pthread"), ("-O3", "-pthread"))

_lock = threading.Lock()
_state: dict[str, object] = {"lib": None, "tried": False, "status": "not loaded yet"}


def enabled() -> bool:
    """False when TLORA_NATIVE=0 (or off/false/no) turns the compiled kernels off."""
    return os.environ.get(ENV_NATIVE, "1").strip().lower() not in ("0", "off", "false", "no")


def cache_dir() -> Path:
    """Where built libraries are kept."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tlora"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """Model and feature flags of this CPU (a -march=native build must not move between CPUs)."""
    lines = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and key not in {k for k, _ in lines}:
                    lines.append((key, line.strip()))
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|" + "|".join(v for _, v in lines)


def _library_path(compiler: str) -> Path:
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(path.read_bytes())
    digest.update(compiler.encode())
    digest.update(repr(_FLAG_SETS).encode())
    digest.update(_cpu_signature().encode())
    suffix = ".dylib" if platform.system() == "Darwin" else ".so"
    return cache_dir() / f"tlora_chain-{digest.hexdigest()[:16]}{suffix}"


def _build(compiler: str, target: Path) -> None:
    """Compile the sources into one library at `target` (atomically: temp file + rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in _FLAG_SETS:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=target.suffix)
        os.close(fd)
        try:
            proc = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", tmp, *map(str, SOURCES)],
                                  capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            if proc.returncode == 0:
                os.replace(tmp, target)
                return
            errors.append(f"{' '.join(flags)}: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("; ".join(str(e) for e in errors))


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, n, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    lib.tlora_chain_forward.argtypes = [i, i, p, p, p, n, n, n, p, n, n, f, i, i]
    lib.tlora_chain_forward.restype = i
    lib.tlora_chain_backward.argtypes = [i, i, p, p, p, p, p, n, n, n, p, f, p, i, i]
    lib.tlora_chain_backward.restype = i
    lib.tlora_release.argtypes = []
    lib.tlora_release.restype = None
    lib.tlora_vector_width.argtypes = []
    lib.tlora_vector_width.restype = i
    lib.tlora_ring_product.argtypes = [i, i, p, p, i, p]
    lib.tlora_ring_product.restype = i
    lib.tlora_ring_product_backward.argtypes = [i, i, p, p, p, i, p]
    lib.tlora_ring_product_backward.restype = i
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled kernels (building them on first use), or None if unavailable or disabled."""
    if not enabled():
        return None
    if _state["tried"]:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if not _state["tried"]:
            _state["lib"], _state["status"] = _load()
            _state["tried"] = True
    return _state["lib"]  # type: ignore[return-value]


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.name != "posix":
        return None, "unavailable: only built on POSIX systems"
    compiler = _compiler()
    if compiler is None:
        return None, "unavailable: no C compiler found (set CC)"
    try:
        path = _library_path(compiler)
        if not path.exists():
            _build(compiler, path)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # a damaged cached build (builds are atomic, but disks fail): rebuild once
            path.unlink(missing_ok=True)
            _build(compiler, path)
            lib = ctypes.CDLL(str(path))
        return _bind(lib), f"loaded {path}"
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, f"unavailable: build or load failed ({exc})"


def status() -> str:
    """One line: whether the compiled kernels are in use, and why not."""
    if not enabled():
        return f"disabled by {ENV_NATIVE}=0"
    load()
    return str(_state["status"])


def release() -> None:
    """Free the calling thread's kernel work space (if the kernels were loaded)."""
    lib = _state["lib"]
    if lib is not None:
        lib.tlora_release()  # type: ignore[attr-defined]


def vector_width(lib: ctypes.CDLL) -> int:
    """Floats per vector of the built kernels (16 with AVX-512, else 8): a tile is a multiple of it."""
    return int(lib.tlora_vector_width())


def mark_unusable(reason: str) -> None:
    """Stop using the kernels for this process (e.g. a failed self-check)."""
    with _lock:
        _state["lib"], _state["tried"], _state["status"] = None, True, f"unavailable: {reason}"


def _pointers(tensors: list[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _check(t: Tensor, numel: int, what: str) -> None:
    if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() or t.numel() < numel:
        raise ValueError(f"native chain: {what} must be a contiguous float32 CPU tensor of >= {numel} elements")


def _check_call(sizes: tuple[int, ...], rank: int, tokens: int, token_stride: int, channel_stride: int,
                activations: dict[str, Tensor], matrices: dict[str, list[Tensor] | None]) -> None:
    """Everything the C code will read or write must exist: checked here, so a mistake is an
    error and never a stray pointer."""
    width = 1
    for s in sizes:
        width *= s
    extent = (tokens - 1) * token_stride + (width - 1) * channel_stride + 1 if tokens else 0
    for what, t in activations.items():
        _check(t, extent, what)
    for what, mats in matrices.items():
        if mats is None:
            continue
        if len(mats) != len(sizes):
            raise ValueError(f"native chain: {len(mats)} {what} for {len(sizes)} cores")
        for n, m in zip(sizes, mats):
            _check(m, n * n * rank * rank, what)


def _raise_on(rc: int, what: str) -> None:
    if rc:
        raise RuntimeError(f"native chain {what} failed (code {rc}: {'bad plan' if rc == 1 else 'out of memory'})")


def chain_forward(lib: ctypes.CDLL, sizes: tuple[int, ...], rank: int, ops: list[Tensor], x: Tensor,
                  out: Tensor, tokens: int, token_stride: int, channel_stride: int, keep: float,
                  tile: int, threads: int = 1) -> None:
    """out = T x + keep x for `tokens` tokens addressed x[t * token_stride + i * channel_stride]."""
    _check_call(sizes, rank, tokens, token_stride, channel_stride, {"x": x, "out": out}, {"stage matrices": ops})
    _raise_on(lib.tlora_chain_forward(len(sizes), rank, (ctypes.c_int * len(sizes))(*sizes), _pointers(ops),
                                      x.data_ptr(), tokens, token_stride, channel_stride, out.data_ptr(),
                                      token_stride, channel_stride, float(keep), tile, threads), "forward")


def chain_backward(lib: ctypes.CDLL, sizes: tuple[int, ...], rank: int, ops: list[Tensor], ops_t: list[Tensor],
                   x: Tensor, h: Tensor, gx: Tensor | None, grads: list[Tensor] | None, tokens: int,
                   token_stride: int, channel_stride: int, keep: float, tile: int, threads: int = 1) -> None:
    """gx = T^T h + keep h (if gx is given); the stage matrices' gradients added into grads."""
    activations = {"x": x, "h": h, **({"gx": gx} if gx is not None else {})}
    _check_call(sizes, rank, tokens, token_stride, channel_stride, activations,
                {"stage matrices": ops, "transposed stage matrices": ops_t, "gradients": grads})
    _raise_on(lib.tlora_chain_backward(len(sizes), rank, (ctypes.c_int * len(sizes))(*sizes), _pointers(ops),
                                       _pointers(ops_t), x.data_ptr(), h.data_ptr(), tokens, token_stride,
                                       channel_stride, gx.data_ptr() if gx is not None else None, float(keep),
                                       _pointers(grads) if grads is not None else None, tile, threads),
              "backward")


def _ring_sizes(cores: list[Tensor]) -> tuple[tuple[int, ...], int]:
    """(n_d per core, R) of square ring cores (n_d, R, R), each checked as the C code will read it."""
    if not cores or len(cores) > MAX_CORES:
        raise ValueError(f"native ring product: 1 to {MAX_CORES} cores, got {len(cores)}")
    rank = int(cores[0].shape[-1]) if cores[0].dim() == 3 else 0
    for c in cores:
        if c.dim() != 3 or c.shape[1] != rank or c.shape[2] != rank or rank < 1:
            raise ValueError("native ring product: cores must be (n, R, R) with one R")
        _check(c, c.numel(), "ring cores")
    return tuple(int(c.shape[0]) for c in cores), rank


def ring_product(lib: ctypes.CDLL, cores: list[Tensor], out: Tensor, transposed: bool) -> None:
    """out (P, R^2) = the cores' chain products, out[p] = C_1[i_1] ... C_D[i_D] (each R x R block
    transposed when `transposed`), p row-major over the cores' first indices."""
    sizes, rank = _ring_sizes(cores)
    count = 1
    for n in sizes:
        count *= n
    _check(out, count * rank * rank, "ring product output")
    _raise_on(lib.tlora_ring_product(len(sizes), rank, (ctypes.c_int * len(sizes))(*sizes), _pointers(cores),
                                     int(transposed), out.data_ptr()), "ring product")


def ring_product_backward(lib: ctypes.CDLL, cores: list[Tensor], grad: Tensor, transposed: bool,
                          grads: list[Tensor]) -> None:
    """grads[d] (n_d, R, R) = the gradient of each core given `grad` of ring_product's output (overwritten)."""
    sizes, rank = _ring_sizes(cores)
    count = 1
    for n in sizes:
        count *= n
    _check(grad, count * rank * rank, "ring product gradient")
    if len(grads) != len(cores):
        raise ValueError(f"native ring product: {len(grads)} gradients for {len(cores)} cores")
    for n, g in zip(sizes, grads):
        _check(g, n * rank * rank, "ring core gradients")
    _raise_on(lib.tlora_ring_product_backward(len(sizes), rank, (ctypes.c_int * len(sizes))(*sizes),
                                              _pointers(cores), grad.data_ptr(), int(transposed), _pointers(grads)),
              "ring product backward")
