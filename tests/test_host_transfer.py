"""The end of an epoch brings a phase's statistics to the host in one copy, with a number of tensor
operations that does not grow with the number of layers, and the statistics are bit for bit those
of the per-layer formulas on the device (nn_staining.stats.host_statistics)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nn_staining.stats import ChunkPool, Moments, PhaseStats

CLASSES = 5


class CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched while active, and the copies from another device to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.to_host = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[func.overloadpacket.__name__] += 1
        if func.overloadpacket is torch.ops.aten._to_copy and args[0].device != out.device:
            self.to_host += out.device.type == "cpu"
        return out


def filled_phase(
    layers: int, device: str = "cpu", seed: int = 0, masked: bool = False, keep_batches: bool = False
) -> PhaseStats:
    """A phase whose ``layers`` layers (and a Linear input per third layer) saw a few labelled batches,
    with NaNs, out-of-range labels and, with ``masked``, masks; one more layer saw only empty batches."""
    rng = np.random.default_rng(seed)
    stats = PhaseStats(CLASSES, keep_batches=keep_batches, pool=ChunkPool(chunk_bytes=4000))
    for i in range(9):
        n = int(rng.integers(2, 9))
        labels = torch.as_tensor(rng.integers(-1, CLASSES + 1, n), device=device)
        mask = torch.as_tensor(rng.random(n) > 0.3, device=device) if masked else None
        stats.start_batch(None if i == 4 else labels, mask)
        for j in range(layers):
            rows = rng.normal(10.0**j, 1.0 + j, (n, 2 + j % 4)).astype(np.float32)
            if i == 2 and j == 1:
                rows[0, 0] = np.nan
            stats.add(f"l{j}", torch.from_numpy(rows).to(device))
            if j % 3 == 0:
                inputs = rng.normal(-3.0, 2.0, (n, 3)).astype(np.float32)
                stats.add(f"l{j}", torch.from_numpy(inputs).to(device), inputs=True)
        stats.add("empty", torch.zeros(0, 4, device=device))
    stats.reduce_pending()
    return stats


#: ops that make a view (no data read or written): the host buffer's parts are written through them
METADATA_OPS = ("slice", "view", "detach", "alias")


def counted(method, calls: list[int]):
    """``method``, appending to ``calls`` at each call."""

    def wrapper(self, *args, **kwargs):
        calls.append(1)
        return method(self, *args, **kwargs)

    return wrapper


@pytest.mark.parametrize("keep_batches", [False, True])
def test_finish_makes_one_host_copy_with_ops_independent_of_the_layers(monkeypatch, keep_batches) -> None:
    counts = []
    for layers in (2, 12):
        stats = filled_phase(layers, keep_batches=keep_batches)
        cpu_calls = []
        monkeypatch.setattr(torch.Tensor, "cpu", counted(torch.Tensor.cpu, cpu_calls))
        with CountOps() as mode:
            record = stats.finish()
            summary = stats.label_summary()
        monkeypatch.undo()
        assert len(record.outputs) == layers + 1 and len(record.inputs) == (layers + 2) // 3
        assert summary is not None and summary.out_of_range > 0
        assert len(cpu_calls) == 1, "one transfer to the host per phase"
        if not keep_batches:  # per-batch rows: one queued block per chunk and layer, still no op each
            moving = sum(n for op, n in mode.ops.items() if op not in METADATA_OPS)  # ops that touch data
            counts.append(moving)
            assert moving <= 12, mode.ops
    assert len(set(counts)) <= 1, f"op counts {counts} grow with the layers"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_finish_copies_once_from_the_gpu() -> None:
    stats = filled_phase(6, device="cuda")
    with CountOps() as mode:
        stats.finish()
    assert mode.to_host == 1, mode.ops


def device_formulas(m: Moments) -> dict[str, np.ndarray]:
    """The statistics by the per-layer tensor formulas (what end_epoch computed before the single copy)."""
    n = m.observations()
    shift = m.shift.to(torch.float64) if m.shift is not None else 0.0
    out = {}
    if not m.class_only:
        mean_centred = m.sum / n
        var = (m.sum_sq / n - mean_centred * mean_centred).clamp_min(0.0)
        empty = torch.full_like(m.minimum, math.nan)
        out |= {
            "act_count": np.full(m.num_features, n, dtype=np.int64),
            "act_mean": (mean_centred + shift).numpy(),
            "act_std": var.sqrt().numpy(),
            "act_min": (m.minimum if n else empty).numpy(),
            "act_max": (m.maximum if n else empty).numpy(),
            "act_active_frac": (m.active / n).numpy(),
            "act_nan_count": m.nonfinite.round().to(torch.int64).numpy(),
        }
    counts = m.class_count.unsqueeze(1)
    mean = torch.where(counts > 0, m.class_sum / counts.clamp_min(1) + shift, math.nan)
    return out | {"class_count": m.class_count.round().to(torch.int64).numpy(), "class_mean": mean.numpy()}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.ascontiguousarray(a).tobytes() == b.tobytes()


@pytest.mark.parametrize("in_place", [False, True], ids=["host copy", "in place"])
@pytest.mark.parametrize("masked", [False, True])
def test_statistics_are_bit_for_bit_the_device_formulas(masked: bool, in_place: bool) -> None:
    stats = filled_phase(7, seed=3, masked=masked)
    expected = {k: device_formulas(m) for k, m in stats.layer_moments().items()}
    expected_inputs = {k: device_formulas(m) for k, m in stats.layer_moments(inputs=True).items()}
    record = stats.finish(in_place=in_place)
    assert set(record.outputs) == set(expected)
    for layer, want in expected.items():
        got = record.outputs[layer]
        columns = vars(got.activations) | {"class_count": got.classes.count, "class_mean": got.classes.mean}
        for name, value in want.items():
            assert same_bits(columns[name], value), (layer, name)
    assert np.isnan(record.outputs["empty"].activations.act_mean).all()
    assert (record.outputs["empty"].activations.act_count == 0).all()
    for layer, want in expected_inputs.items():
        got = record.inputs[layer]
        assert same_bits(got.count, want["class_count"]) and same_bits(got.mean, want["class_mean"]), layer


@pytest.mark.parametrize("in_place", [False, True], ids=["host copy", "in place"])
def test_one_layer_result_is_the_phase_result(in_place: bool) -> None:
    stats = filled_phase(3, seed=5, keep_batches=True)
    alone = {k: m.result() for k, m in stats.layer_moments().items()}
    record = stats.finish(in_place=in_place)
    for layer, result in alone.items():
        for name, value in vars(result.activations).items():
            assert same_bits(getattr(record.outputs[layer].activations, name), value), (layer, name)
        if result.batches is not None:
            for name, value in vars(result.batches).items():
                assert same_bits(getattr(record.outputs[layer].batches, name), value), (layer, name)


def test_finishing_in_place_copies_nothing(monkeypatch) -> None:
    """An epoch's last use of CPU sums (a large epoch's end) finishes them where they lie: no host
    copy, and the record's statistics are the running sums' own memory."""
    stats = filled_phase(4, keep_batches=True)
    outputs, inputs = stats.layer_moments(), stats.layer_moments(inputs=True)
    cpu_calls = []
    monkeypatch.setattr(torch.Tensor, "cpu", counted(torch.Tensor.cpu, cpu_calls))
    record = stats.finish(in_place=True)
    monkeypatch.undo()
    assert cpu_calls == []
    for layer, m in outputs.items():
        got = record.outputs[layer]
        assert np.shares_memory(got.activations.act_mean, m.sum.numpy()), layer
        assert np.shares_memory(got.activations.act_std, m.sum_sq.numpy()), layer
        assert np.shares_memory(got.activations.act_min, m.minimum.numpy()), layer
        assert np.shares_memory(got.classes.mean, m.class_sum.numpy()), layer
        if len(m.batches) == 1:  # one chunk's per-batch rows; several are joined (a copy)
            assert np.shares_memory(got.batches.act_mean, m.batches[0][1].numpy()), layer
    for layer, m in inputs.items():
        assert np.shares_memory(record.inputs[layer].mean, m.class_sum.numpy()), layer
    spent = outputs["l0"]
    for again in (
        lambda: stats.finish(),
        lambda: stats.start_batch(None),
        lambda: stats.add("l0", torch.ones(2, spent.num_features)),
        lambda: stats.add_mean("l0", torch.ones(2, spent.num_features, 3), (2,)),
        stats.reduce_pending,
        spent.result,
        spent.class_means,
        lambda: spent.update(torch.ones(2, spent.num_features)),
    ):
        with pytest.raises(RuntimeError, match="finished in place"):
            again()  # its sums are statistics now: no more folds, no second finish, no reading
    copied = filled_phase(4, keep_batches=True)  # the same batches
    copied.finish()
    assert stats.label_summary() == copied.label_summary()
    assert stats.label_summary().out_of_range > 0


def test_finishing_in_place_folds_the_last_chunk_first() -> None:
    """finish reduces the rows still buffered (here after an earlier reduction made the sums)
    before it turns the sums into statistics, in place as in the copy: the same numbers."""
    records = []
    for in_place in (False, True):
        torch.manual_seed(0)
        stats = PhaseStats(CLASSES)
        stats.start_batch(None)
        stats.add("a", torch.randn(4, 3))
        stats.reduce_pending()
        stats.start_batch(torch.tensor([0, 1, 1, 4]))
        stats.add("a", torch.randn(4, 3) + 5, inputs=False)
        stats.start_batch(None, torch.tensor([True, False, True]))
        stats.add("a", torch.randn(3, 3))
        stats.add("empty", torch.zeros(0, 2))
        records.append(stats.finish(in_place=in_place))
    copied, finished = records
    assert finished.outputs["a"].activations.act_count[0] == 10
    for layer, got in finished.outputs.items():
        for name, value in vars(copied.outputs[layer].activations).items():
            assert same_bits(getattr(got.activations, name), value), (layer, name)
        assert same_bits(got.classes.mean, copied.outputs[layer].classes.mean), layer
