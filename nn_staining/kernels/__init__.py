"""The fused chunk reductions behind :class:`~nn_staining.stats.Moments`, one pass over each value.

- CPU rows: ``reduce.cpp``, a C++ kernel built with ``torch.utils.cpp_extension`` the first time a
  process needs it and cached per machine (``$NN_STAINING_CACHE``, else
  ``~/.cache/nn_staining/kernels/<torch>-<hash>/``); a file lock makes concurrent processes (DDP
  ranks, test workers) wait for one build.
- CUDA rows: ``fold_triton.py``, a Triton kernel (compiled by Triton on first use, cached by it).

Where a kernel cannot be built or imported, the reductions run on torch ops, and one log message
says why. ``NN_STAINING_KERNEL`` chooses: ``auto`` (the default), ``cpp`` (a failed C++ build is an
error), ``triton`` (a missing Triton is an error; with ``TRITON_INTERPRET=1`` CPU rows go through
the Triton kernel too, in Triton's interpreter: how the tests check it without a GPU) or ``torch``
(torch ops everywhere).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
#: Environment variable choosing the reductions: ``auto`` (the default), ``cpp``, ``triton`` or ``torch``.
ENV = "NN_STAINING_KERNEL"
CHOICES = ("auto", "cpp", "triton", "torch")
LIBRARY = "nn_staining_kernels"


@dataclass(frozen=True)
class Backend:
    """Which code reduces chunks of one device type (``cpp``, ``triton`` or ``torch``), why, and the
    kernel's ops (an object with ``fold_chunk``; None for torch ops)."""

    name: str
    why: str
    ops: Any = None
    #: CPU rows go to the Triton kernel in Triton's interpreter (``NN_STAINING_KERNEL=triton``,
    #: ``TRITON_INTERPRET=1``: how the tests run the GPU kernel without a GPU)
    interpreted_triton: bool = False


class EarlierFailure(RuntimeError):
    """The kernel's build failed in an earlier process (its reason is remembered in the cache)."""


_lock = threading.Lock()
_backend: Backend | None = None
_cuda_backend: Backend | None = None


def backend() -> Backend:
    """The CPU reduction backend of this process, chosen (and the kernel built or loaded) on first call."""
    global _backend
    if _backend is not None:
        return _backend
    with _lock:
        if _backend is None:
            choice = _choice()
            chosen = _choose(choice)
            if choice == "triton" and _interpreting():
                chosen = dataclasses.replace(chosen, interpreted_triton=True)
            _backend = chosen
        return _backend


def cuda_backend() -> Backend:
    """The reduction backend for CUDA rows (``triton`` or ``torch``), chosen on first call."""
    global _cuda_backend
    if _cuda_backend is not None:
        return _cuda_backend
    with _lock:
        if _cuda_backend is None:
            _cuda_backend = _choose_cuda(_choice())
        return _cuda_backend


def describe() -> dict[str, str]:
    """``meta.json``'s ``reduction`` entry: the CPU backend and why, and the CUDA backend and why."""
    chosen = backend()
    if chosen.interpreted_triton:
        chosen = Backend("triton", "Triton's interpreter (TRITON_INTERPRET=1, NN_STAINING_KERNEL=triton)")
    if torch.cuda.is_available():
        cuda = cuda_backend()
        cuda_name, cuda_why = cuda.name, cuda.why
    else:
        cuda_name, cuda_why = "none", "no CUDA device"
    return {"backend": chosen.name, "why": chosen.why, "cuda": cuda_name, "cuda_why": cuda_why}


def fused_ops(rows: torch.Tensor) -> Any | None:
    """The kernel that folds ``rows`` (float32), or None where torch ops must (other dtypes, devices,
    or no kernel). With ``NN_STAINING_KERNEL=triton`` and ``TRITON_INTERPRET=1``, CPU rows take the
    Triton kernel (in Triton's interpreter). Called for every layer of every batch: no lookups."""
    if rows.dtype != torch.float32:
        return None
    device = rows.device.type
    if device == "cpu":
        return cpu_ops()
    if device == "cuda":
        return (_cuda_backend if _cuda_backend is not None else cuda_backend()).ops
    return None


def cpu_ops() -> Any | None:
    """The kernel that folds CPU float32 rows (:func:`fused_ops` of such rows), or None."""
    chosen = _backend if _backend is not None else backend()
    return cuda_backend().ops if chosen.interpreted_triton else chosen.ops


class CppOps:
    """The C++ kernel's entry point, resolved once (``torch.ops`` namespaces look names up on each
    access, and a missing one such as ``per_batch`` is slow to miss)."""

    #: the kernel gives per-batch rows itself
    per_batch = True

    def __init__(self) -> None:
        self.fold_chunk = torch.ops.nn_staining.fold_chunk


@contextlib.contextmanager
def using(name: str) -> Iterator[Backend]:
    """Reduce chunks with ``name`` inside the block, to compare the paths in one process (tests,
    benchmarks): ``cpp`` (CPU rows; ``RuntimeError`` without the kernel), ``triton`` (CUDA rows;
    ``RuntimeError`` without Triton) or ``torch`` (torch ops on every device). It sets the
    process's choice: use it from one thread, with no recording running in another."""
    global _backend, _cuda_backend
    chosen, chosen_cuda = backend(), _cuda_backend
    if name not in ("cpp", "triton", "torch"):
        raise ValueError(f"reduction backend {name!r} is not one of: cpp, triton, torch")
    torch_ops = Backend("torch", "chosen for a comparison")
    wanted, wanted_cuda = chosen, chosen_cuda
    if name == "cpp":
        if chosen.ops is None:
            raise RuntimeError(f"the C++ reduction kernel is not available: {chosen.why}")
        wanted = dataclasses.replace(chosen, interpreted_triton=False)
    elif name == "triton":
        wanted_cuda = cuda_backend()
        if wanted_cuda.ops is None:
            raise RuntimeError(f"the Triton reduction kernel is not available: {wanted_cuda.why}")
        wanted = dataclasses.replace(chosen, interpreted_triton=_interpreting())
    else:
        wanted = chosen if chosen.name == "torch" else torch_ops
        wanted_cuda = torch_ops
    with _lock:
        previous, previous_cuda = _backend, _cuda_backend
        _backend, _cuda_backend = wanted, wanted_cuda
    try:
        yield wanted_cuda if name == "triton" else wanted
    finally:
        with _lock:
            _backend, _cuda_backend = previous, previous_cuda


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


def _choice() -> str:
    """``NN_STAINING_KERNEL``, checked."""
    return _checked(os.environ.get(ENV, "auto").strip().lower() or "auto")


def _checked(choice: str) -> str:
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r} is not a reduction backend; valid: {', '.join(CHOICES)}")
    return choice


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _choose(choice: str) -> Backend:
    if _checked(choice) == "torch":
        return Backend("torch", f"{ENV}=torch")
    try:
        why = _load()
    except Exception as exc:  # no compiler, no headers, a read-only cache …
        if choice == "cpp":
            raise RuntimeError(f"{ENV}=cpp but the reduction kernel could not be built: {exc}") from exc
        reason = f"the C++ reduction kernel could not be built or loaded ({_summary(exc)})"
        logger.warning("nn_staining reduces activations with torch ops: %s", reason)
        return Backend("torch", reason)
    return Backend("cpp", why, CppOps())


def _choose_cuda(choice: str) -> Backend:
    """Triton's kernel for CUDA rows unless ``torch`` is chosen or Triton cannot be imported."""
    if choice == "torch":
        return Backend("torch", f"{ENV}=torch")
    try:
        from . import fold_triton
    except Exception as exc:  # no Triton (a CPU-only torch, a platform it does not ship for)
        if choice == "triton":
            raise RuntimeError(f"{ENV}=triton but Triton could not be imported: {exc}") from exc
        reason = f"Triton could not be imported ({_summary(exc)})"
        logger.warning("nn_staining reduces CUDA activations with torch ops: %s", reason)
        return Backend("torch", reason)
    import triton

    if torch.cuda.is_available() and not _interpreting():
        try:
            fold_triton.smoke_test()
        except Exception as exc:  # no C compiler for Triton's launcher, an unsupported GPU …
            if choice == "triton":
                raise RuntimeError(f"{ENV}=triton but the Triton kernel failed on this GPU: {exc}") from exc
            reason = f"the Triton kernel failed on this GPU ({_summary(exc)})"
            logger.warning("nn_staining reduces CUDA activations with torch ops: %s", reason)
            return Backend("torch", reason)
    return Backend("triton", f"Triton {triton.__version__}", fold_triton)


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
