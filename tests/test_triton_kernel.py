"""Tests for the Triton kernel that folds CUDA rows (nn_staining/kernels/fold_triton.py), against
numpy float64 on the same rows and against the torch-op path: tile and class-group edges, NaN and
infinite values, masked rows, rows without a class, values far beyond float32's squares, the
float32 drift of a long epoch, per-batch rows, a recorded training run, and no host sync.

Where a CUDA GPU is present the kernel tests run on it. Without one,
``test_the_kernel_passes_in_tritons_interpreter`` runs this file again (and the recorder's mask
tests) in a subprocess under Triton's interpreter (``TRITON_INTERPRET=1``), on CPU tensors, and
``test_both_kernels_compile_to_gpu_code`` compiles the kernels to Hopper and Ampere machine code
with the ptxas that Triton ships, so a kernel that only the interpreter accepts fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_kernels import check, columns, expected, random_chunks
from test_kernels import fold as fold_chunks
from torch import nn

from nn_staining import NetworkTrace, kernels, load_trace
from nn_staining.stats import Moments

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
INTERPRETING = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRETING else None)
on_device = pytest.mark.skipif(
    DEVICE is None, reason="needs a CUDA GPU, or Triton's interpreter (the subprocess test runs it)"
)


def fold(
    chunks: list[np.ndarray],
    labels: list[np.ndarray | None],
    drops: list[np.ndarray | None],
    classes: int,
    class_only: bool = False,
    backend: str = "triton",
    keep_batches: bool = False,
) -> Moments:
    """Every chunk folded on DEVICE into one Moments by ``backend``; each chunk is two batches."""
    return fold_chunks(backend, chunks, labels, drops, classes, class_only, DEVICE, keep_batches)


def fold_labels(labels: list[np.ndarray], classes: int) -> list[np.ndarray]:
    """Labels as the recorder hands them to a kernel: ``classes`` for every row without a class."""
    return [np.where((lab < 0) | (lab >= classes), classes, lab).astype(np.int64) for lab in labels]


@on_device
def test_the_triton_backend_is_the_one_folding(monkeypatch) -> None:
    """Under ``using("triton")`` every fold of DEVICE rows goes through the Triton module."""
    from nn_staining.kernels import fold_triton

    kernels.cuda_backend()  # chosen first: on a GPU the choice folds two rows of its own (a smoke test)
    calls = []
    real = fold_triton.fold_chunk
    monkeypatch.setattr(
        fold_triton, "fold_chunk", lambda *a, **k: calls.append(tuple(a[0].shape)) or real(*a, **k)
    )
    fold([np.ones((3, 2), np.float32)], [np.array([0, 1, 1])], [None], 2)
    assert calls == [(3, 2)]


@on_device
@pytest.mark.parametrize("width", [1, 63, 64, 65, 130])
@pytest.mark.parametrize("masked", [False, True])
def test_fold_matches_numpy_across_tile_widths(width: int, masked: bool) -> None:
    rng = np.random.default_rng(width)
    chunks, labels, drops = random_chunks(rng, width, 4, [1, 70, 200, 3], masked)
    labels[2][::7] = -1  # the kernel takes raw labels: -1 and 4 (= classes) are no class
    got = columns(fold(chunks, labels, drops, 4))
    check(got, expected(chunks, labels, drops, 4))
    reference = columns(fold(chunks, fold_labels(labels, 4), drops, 4, backend="torch"))
    check(got, reference, rtol=1e-6)


@on_device
@pytest.mark.parametrize("classes", [1, 17, 70, 130])
def test_fold_matches_numpy_across_class_groups(classes: int) -> None:
    """More classes than one program's 64 slots: each group of classes re-reads the rows."""
    rng = np.random.default_rng(classes)
    chunks, labels, drops = random_chunks(rng, 33, classes, [300, 45], masked=True)
    labels[0][5], chunks[0][5, 2] = classes - 1, np.nan  # in the last group: only its class is spoilt
    got = columns(fold(chunks, fold_labels(labels, classes), drops, classes))
    check(got, expected(chunks, labels, drops, classes))
    assert np.isnan(got["class_mean"][classes - 1, 2])
    others = np.delete(got["class_mean"][:, 2], classes - 1)[np.delete(got["class_count"], classes - 1) > 0]
    assert np.isfinite(others).all()


@on_device
def test_nan_and_infinite_values_stay_in_their_neurons_and_classes() -> None:
    """NaN propagates into its neuron's min, max, mean and its own row's class mean only (the
    product over classes would spread 0 × NaN to every class: those blocks sum class by class)."""
    rng = np.random.default_rng(1)
    chunks, labels, drops = random_chunks(rng, 5, 3, [40, 40])
    labels = fold_labels(labels, 3)
    chunks[0][3, 1] = np.nan
    chunks[1][0, 2] = np.inf
    chunks[1][5, 2] = -np.inf
    chunks[1][7, 4] = np.nan
    chunks[1][8, 4] = np.inf
    got = columns(fold(chunks, labels, drops, 3))
    want = expected(chunks, labels, drops, 3)
    np.testing.assert_array_equal(got["act_nan_count"], [0, 1, 2, 0, 2])
    assert np.isnan(got["act_min"][[1, 4]]).all() and np.isnan(got["act_max"][[1, 4]]).all()
    assert got["act_min"][2] == -np.inf and got["act_max"][2] == np.inf
    for name in ("act_mean", "act_std", "act_active_frac"):
        np.testing.assert_allclose(got[name][[0, 3]], want[name][[0, 3]], rtol=1e-5, err_msg=name)
    row_class = labels[0][3]
    clean = [c for c in range(3) if c != row_class]
    if row_class < 3:
        assert np.isnan(got["class_mean"][row_class, 1])
    np.testing.assert_allclose(got["class_mean"][clean, 1], want["class_mean"][clean, 1], rtol=1e-5)
    np.testing.assert_allclose(got["class_mean"][:, 0], want["class_mean"][:, 0], rtol=1e-5)
    reference = columns(fold(chunks, labels, drops, 3, backend="torch"))
    for name in got:
        np.testing.assert_allclose(got[name], reference[name], rtol=1e-6, equal_nan=True, err_msg=name)


@on_device
def test_empty_classes_single_rows_and_fully_masked_chunks() -> None:
    rng = np.random.default_rng(2)
    rows = [rng.normal(0.0, 1.0, (30, 6)).astype(np.float32)]
    labels = [np.where(np.arange(30) % 3 == 1, 0, 5).astype(np.int64)]  # 5: no class
    got = columns(fold(rows, labels, [None], 5))
    np.testing.assert_array_equal(got["class_count"], [10, 0, 0, 0, 0])
    assert np.isnan(got["class_mean"][1:]).all()
    np.testing.assert_allclose(got["class_mean"][0], rows[0][1::3].astype(np.float64).mean(0), rtol=1e-5)
    single = columns(fold([np.array([[1.5, -2.0, 0.0]], dtype=np.float32)], [None], [None], 0))
    np.testing.assert_array_equal(single["act_mean"], [1.5, -2.0, 0.0])
    np.testing.assert_array_equal(single["act_std"], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(single["act_active_frac"], [1.0, 0.0, 0.0])
    masked = columns(fold([np.ones((4, 2), np.float32)], [np.zeros(4, np.int64)], [np.ones(4, bool)], 2))
    np.testing.assert_array_equal(masked["act_count"], [0, 0])
    assert np.isnan(masked["act_mean"]).all() and np.isnan(masked["act_min"]).all()
    np.testing.assert_array_equal(masked["class_count"], [0, 0])


@on_device
def test_values_far_beyond_float32_squares() -> None:
    """A neuron at ±1e25: its squares overflow float32, so the kernel squares in float64."""
    rng = np.random.default_rng(3)
    chunks = [rng.normal(0.0, 1.0, (50, 3)).astype(np.float32) for _ in range(2)]
    chunks[1][:, 1] = rng.normal(0.0, 1e25, 50).astype(np.float32)
    labels = [rng.integers(0, 2, 50) for _ in range(2)]
    got = columns(fold(chunks, labels, [None, None], 2))
    assert np.isfinite(got["act_std"]).all()
    check(got, expected(chunks, labels, [None, None], 2), rtol=1e-4)


@on_device
def test_class_sums_beyond_float32_stay_finite() -> None:
    """40 rows of one class at 2e37: their float32 sum would overflow; such a block sums in float64."""
    rows = np.zeros((40, 2), np.float32)
    rows[:, 0] = 2e37
    labels = np.zeros(40, np.int64)
    got = columns(fold([rows], [labels], [None], 2))
    np.testing.assert_allclose(got["class_mean"][0], [2e37, 0.0], rtol=1e-6)
    np.testing.assert_allclose(got["act_mean"], [2e37, 0.0], rtol=1e-6)


@on_device
def test_class_only_sums() -> None:
    """A Linear's input: only per-class counts and means, masked rows left out."""
    rng = np.random.default_rng(4)
    chunks, labels, drops = random_chunks(rng, 130, 3, [64, 9], masked=True)
    got = fold(chunks, fold_labels(labels, 3), drops, 3, class_only=True).class_means()
    want = expected(chunks, labels, drops, 3)
    np.testing.assert_array_equal(got.count, want["class_count"])
    np.testing.assert_allclose(got.mean, want["class_mean"], rtol=1e-5)


@on_device
def test_per_batch_rows_come_from_torch_ops_beside_the_kernel() -> None:
    rng = np.random.default_rng(5)
    chunks, labels, drops = random_chunks(rng, 9, 2, [20, 7])
    got = fold(chunks, fold_labels(labels, 2), drops, 2, keep_batches=True).result().batches
    want = fold(chunks, fold_labels(labels, 2), drops, 2, backend="torch", keep_batches=True).result().batches
    np.testing.assert_array_equal(got.batch, [0, 1, 2, 3])
    for name in ("act_count", "act_mean", "act_std", "act_min", "act_max"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(got.act_mean[0], chunks[0][:10].astype(np.float64).mean(0), rtol=1e-12)


@on_device
def test_long_epoch_far_from_zero_keeps_std_precise() -> None:
    """2,000 chunks of 32 rows with mean 1e4 and std 1 (the C++ kernel's drift test; 200 in the
    interpreter, where each launch takes about 20 ms)."""
    rng = np.random.default_rng(6)
    chunks = 2000 if DEVICE == "cuda" else 200
    data = rng.normal(1e4, 1.0, (chunks, 32, 4)).astype(np.float32)
    labels = rng.integers(0, 3, (chunks, 32))
    moments = Moments(4, 3, torch.device(DEVICE))
    rows, lab = torch.from_numpy(data).to(DEVICE), torch.from_numpy(labels).to(DEVICE)
    with kernels.using("triton"):
        for i in range(len(data)):
            moments.update(rows[i], lab[i])
    got = columns(moments)
    flat = data.reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(got["act_std"], flat.std(0), rtol=1e-4)
    np.testing.assert_allclose(got["act_mean"], flat.mean(0), rtol=1e-9)
    for c in range(3):
        np.testing.assert_allclose(got["class_mean"][c], flat[labels.reshape(-1) == c].mean(0), rtol=1e-9)


def train_recorded(path: Path, backend: str, sync_debug: bool = False) -> None:
    """Two epochs of a small MLP on DEVICE, recorded with ``backend``'s reductions (and with
    ``sync_debug``, CUDA's sync debug mode raising on any host sync inside the batch loop)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 70), nn.GELU(), nn.Linear(70, 5)).to(
        DEVICE
    )
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y = (x[:, 0] * 2 + x[:, 1]).gt(0).long() + 2 * x[:, 2].gt(0.5).long()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    with kernels.using(backend), NetworkTrace(model, path, num_classes=5) as trace:
        for epoch in range(2):
            trace.start_epoch(epoch)
            if sync_debug:
                torch.cuda.set_sync_debug_mode("error")
            try:
                for i in range(0, 300, 32):
                    trace.set_targets(y[i : i + 32])
                    loss = nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
            finally:
                if sync_debug:
                    torch.cuda.set_sync_debug_mode("default")
            trace.end_epoch()


@on_device
def test_a_recorded_run_matches_the_torch_op_path(tmp_path: Path) -> None:
    train_recorded(tmp_path / "triton", "triton")
    train_recorded(tmp_path / "torch", "torch")
    got, want = load_trace(tmp_path / "triton"), load_trace(tmp_path / "torch")
    for a, b in [(got.to_dataframe(), want.to_dataframe()), (got.classes(), want.classes())]:
        assert len(a) == len(b) > 0
        numeric = [c for c in a.columns if a[c].dtype.kind == "f"]
        np.testing.assert_allclose(a[numeric].to_numpy(), b[numeric].to_numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_inside_the_batch_loop(tmp_path: Path) -> None:
    train_recorded(tmp_path / "t", "triton", sync_debug=True)
    assert load_trace(tmp_path / "t").epochs == [0, 1]


@pytest.mark.skipif(INTERPRETING or torch.cuda.is_available(), reason="runs the interpreter in a subprocess")
def test_the_kernel_passes_in_tritons_interpreter() -> None:
    """This file's kernel tests and the recorder's mask tests, with CPU rows folded by the Triton
    kernel in Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1", kernels.ENV: "triton"}
    files = [str(ROOT / "tests" / "test_triton_kernel.py"), str(ROOT / "tests" / "test_recorder_masks.py")]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


@pytest.mark.skipif(INTERPRETING, reason="the interpreter does not compile")
@pytest.mark.parametrize("capability", [80, 90])
def test_both_kernels_compile_to_gpu_code(capability: int) -> None:
    """Triton's compiler and its bundled ptxas accept the kernels for Ampere and Hopper (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nn_staining.kernels import fold_triton

    def source(fn, types: dict[str, str], constants: dict[str, object]) -> ASTSource:
        signature = {a: types.get(a, "constexpr" if a in constants else "i32") for a in fn.arg_names}
        return ASTSource(fn, signature, constants)

    target = GPUTarget("cuda", capability, 32)
    pointers = {"rows": "*fp32", "shift": "*fp32", "labels": "*i64", "dropped": "*u8"}
    pointers |= {name: "*fp64" for name in ("work", "class_work", "count_work")}
    sums = {
        name: "*fp64" for name in ("work", "class_work", "count_work", "total", "squares", "active", "bad")
    }
    sums |= {"class_count": "*fp64", "class_sum": "*fp64", "low": "*fp32", "high": "*fp32"}
    cases = [
        (True, True, True, 16),
        (True, False, False, 64),
        (False, False, True, 16),
        (True, False, True, 64),
    ]
    for labels, dropped, full, slots in cases:  # 64 slots: the largest unrolled class-by-class loop
        shape = {"BLOCK_COLS": fold_triton.BLOCK_COLS, "SLOTS": slots, "STATS_ROWS": fold_triton.STATS}
        flags = {"HAS_LABELS": labels, "FULL": full}
        split = source(
            fold_triton._fold_split,
            pointers,
            {**flags, **shape, "HAS_DROPPED": dropped, "BLOCK_ROWS": fold_triton.BLOCK_ROWS},
        )
        combine = source(fold_triton._combine, sums, {**flags, **shape})
        for kernel in (triton.compile(split, target=target), triton.compile(combine, target=target)):
            assert kernel.asm["cubin"]


def test_without_triton_cuda_rows_take_torch_ops(monkeypatch, caplog) -> None:
    """No importable Triton: one warning and the torch ops; ``NN_STAINING_KERNEL=triton`` makes it an error."""
    import builtins

    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton.") or (args and args[2] and "fold_triton" in args[2]):
            raise ImportError("No module named 'triton'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    monkeypatch.delitem(sys.modules, "nn_staining.kernels.fold_triton", raising=False)
    with caplog.at_level("WARNING", logger="nn_staining.kernels"):
        chosen = kernels._choose_cuda("auto")
    assert chosen.name == "torch" and chosen.ops is None and "Triton could not be imported" in chosen.why
    assert [r.getMessage() for r in caplog.records] == [
        f"nn_staining reduces CUDA activations with torch ops: {chosen.why}"
    ]
    with pytest.raises(RuntimeError, match="NN_STAINING_KERNEL=triton but Triton could not be imported"):
        kernels._choose_cuda("triton")
    assert kernels._choose_cuda("torch") == kernels.Backend("torch", "NN_STAINING_KERNEL=torch")
