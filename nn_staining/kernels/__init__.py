"""The fused chunk reduction: ``reduce.cpp``, a C++ CPU kernel that folds a chunk of float32 rows
into :class:`~nn_staining.stats.Moments` in one pass over each value.

It is built with ``torch.utils.cpp_extension`` the first time a process needs it and cached per
machine (``$NN_STAINING_CACHE``, else ``~/.cache/nn_staining/kernels/<torch>-<hash>/``); a file
lock makes concurrent processes (DDP ranks, test workers) wait for one build. When it cannot be
built or loaded, the reductions run on torch ops, and one log message says why.
``NN_STAINING_KERNEL=torch`` forces the torch ops; ``=cpp`` makes a failed build an error. GPU
rows always take the torch ops.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("reduce.cpp")
#: Environment variable choosing the CPU reduction: ``auto`` (the default), ``cpp`` or ``torch``.
ENV = "NN_STAINING_KERNEL"
CHOICES = ("auto", "cpp", "torch")
LIBRARY = "nn_staining_kernels"


@dataclass(frozen=True)
class Backend:
    """Which code reduces CPU chunks (``cpp`` or ``torch``), why, and the kernel's ops (None for torch)."""

    name: str
    why: str
    ops: Any = None


class EarlierFailure(RuntimeError):
    """The kernel's build failed in an earlier process (its reason is remembered in the cache)."""


_lock = threading.Lock()
_backend: Backend | None = None


def backend() -> Backend:
    """The CPU reduction backend of this process, chosen (and the kernel built or loaded) on first call."""
    global _backend
    if _backend is not None:
        return _backend
    with _lock:
        if _backend is None:
            _backend = _choose(os.environ.get(ENV, "auto").strip().lower() or "auto")
        return _backend


def describe() -> dict[str, str]:
    """``meta.json``'s ``reduction`` entry: the CPU backend and why (GPU rows use torch ops)."""
    chosen = backend()
    return {"backend": chosen.name, "why": chosen.why, "cuda": "torch"}


def cpu_ops(rows: torch.Tensor) -> Any | None:
    """The kernel's ops when ``rows`` (float32) can be reduced by it, else None (torch ops)."""
    if rows.device.type != "cpu" or rows.dtype != torch.float32:
        return None
    return backend().ops


@contextlib.contextmanager
def using(name: str) -> Iterator[Backend]:
    """Reduce CPU chunks with ``name`` (``cpp`` or ``torch``) inside the block, to compare the two
    paths in one process (tests, benchmarks); ``cpp`` raises ``RuntimeError`` without the kernel."""
    global _backend
    chosen = backend()
    if name not in ("cpp", "torch"):
        raise ValueError(f"reduction backend {name!r} is not one of: cpp, torch")
    if name == "cpp" and chosen.ops is None:
        raise RuntimeError(f"the C++ reduction kernel is not available: {chosen.why}")
    wanted = chosen if name == chosen.name else Backend("torch", "chosen for a comparison")
    with _lock:
        previous, _backend = _backend, wanted
    try:
        yield wanted
    finally:
        with _lock:
            _backend = previous


def cache_dir() -> Path:
    """Where this machine's build of the kernel lives: one folder per torch version, source and flags."""
    root = os.environ.get("NN_STAINING_CACHE")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nn_staining"
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), torch.__version__, platform.machine(), *compile_flags()]).encode()
    ).hexdigest()[:16]
    return base / "kernels" / f"{torch.__version__.replace('+', '_')}-{key}"


def compile_flags() -> list[str]:
    """-O3, and AVX2/FMA where this CPU has them (they are part of the cache key)."""
    flags = ["-O3"]
    if platform.machine() in ("x86_64", "AMD64"):
        with contextlib.suppress(OSError):
            cpu = Path("/proc/cpuinfo").read_text()
            if " avx2" in cpu and " fma" in cpu:
                flags += ["-mavx2", "-mfma"]
    return flags


def _choose(choice: str) -> Backend:
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r} is not a reduction backend; valid: {', '.join(CHOICES)}")
    if choice == "torch":
        return Backend("torch", f"{ENV}=torch")
    try:
        why = _load()
    except Exception as exc:  # no compiler, no headers, a read-only cache …
        if choice == "cpp":
            raise RuntimeError(f"{ENV}=cpp but the reduction kernel could not be built: {exc}") from exc
        reason = f"the C++ reduction kernel could not be built or loaded ({_summary(exc)})"
        logger.warning("nn_staining reduces activations with torch ops: %s", reason)
        return Backend("torch", reason)
    return Backend("cpp", why, torch.ops.nn_staining)


def _summary(exc: Exception) -> str:
    """The exception's type, first line and the compiler's error lines (not the whole build log)."""
    if isinstance(exc, EarlierFailure):
        return str(exc)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = lines[0][:200] if lines else ""
    errors = [line[:300] for line in lines[1:] if "error" in line.lower()][:3]
    return "; ".join([f"{type(exc).__name__}: {first}", *errors])


def _load() -> str:
    """Load the cached kernel, building it first (under a file lock) when this machine has none."""
    folder = cache_dir()
    library, failed = folder / f"{LIBRARY}.so", folder / "failed.txt"
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with _file_lock(folder / "build.lock"):
            if failed.exists():  # no process retries a failed build (each would wait for it)
                raise EarlierFailure(f"{failed.read_text()} (an earlier build; delete {folder} to try again)")
            if not library.exists():  # another process may have built it while we waited
                try:
                    seconds = _build(folder, library)  # loads it too
                except Exception as exc:
                    failed.write_text(_summary(exc))
                    raise
                return f"built in {seconds:.0f} s, cached in {folder}"
    torch.ops.load_library(str(library))
    return f"cached in {folder}"


def _build(folder: Path, library: Path) -> float:
    """Compile and load ``reduce.cpp`` in ``folder/build``, then move the library into place (atomically)."""
    from torch.utils import cpp_extension

    start = time.perf_counter()
    logger.info("building nn_staining's C++ reduction kernel once, in %s", folder)
    build = folder / "build"
    if build.exists():
        shutil.rmtree(build)  # a build a killed process left half done
    build.mkdir()
    with _ninja_on_path():
        built = cpp_extension.load(
            LIBRARY,
            [str(SOURCE)],
            extra_cflags=compile_flags(),
            build_directory=str(build),
            with_cuda=False,
            is_python_module=False,
        )
    os.replace(built, library)
    seconds = time.perf_counter() - start
    logger.info("built nn_staining's reduction kernel in %.1f s", seconds)
    return seconds


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """``ninja`` findable by torch's build while it runs (the pip wheel puts it beside python)."""
    if shutil.which("ninja"):
        yield
        return
    import ninja

    old = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` held by this process (freed by the OS if it dies)."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
