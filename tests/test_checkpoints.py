"""Checkpoints beside a trace: safetensors round trip, atomic writes, listing and clear errors."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from torch import nn

from nn_staining import checkpoints
from nn_staining.checkpoints import checkpoint_epochs, checkpoint_path, read_checkpoint, write_checkpoint


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model(torch.randn(8, 4))  # BatchNorm running stats and its int64 counter change
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state["half"] = torch.randn(5).to(torch.bfloat16)
    return state


def test_path_layout(tmp_path):
    assert checkpoint_path(tmp_path, 7) == tmp_path / "checkpoints" / "epoch=7" / "model.safetensors"


def test_round_trip_is_bit_exact_with_dtypes(tmp_path):
    state = _state()
    write_checkpoint(tmp_path, 3, state)
    back = read_checkpoint(tmp_path, 3)
    assert back.keys() == state.keys()
    for name, value in state.items():
        assert back[name].dtype == value.dtype, name
        assert back[name].shape == value.shape, name
        assert torch.equal(back[name].flatten().view(torch.uint8), value.flatten().view(torch.uint8)), name


def test_file_is_plain_safetensors_without_pickle(tmp_path):
    write_checkpoint(tmp_path, 0, {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)})
    raw = checkpoint_path(tmp_path, 0).read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])  # the safetensors header: u64 length, then JSON
    header = json.loads(raw[8 : 8 + size])
    assert header["w"]["dtype"] == "F32" and header["w"]["shape"] == [2, 3]
    assert header["__metadata__"] == {"format": "nn_staining.checkpoint", "epoch": "0"}
    assert b"\x80\x04" not in raw[:2]  # not a pickle protocol header
    assert struct.unpack("<6f", raw[8 + size :]) == (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)


def test_shared_and_non_contiguous_tensors_are_written(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"a": base, "b": base, "t": base.t()}  # tied weights share memory; a transpose is strided
    write_checkpoint(tmp_path, 1, state)
    back = read_checkpoint(tmp_path, 1)
    assert torch.equal(back["a"], base) and torch.equal(back["b"], base) and torch.equal(back["t"], base.t())


def test_listing_ignores_temporary_and_foreign_entries(tmp_path):
    for epoch in (5, 0, 12):
        write_checkpoint(tmp_path, epoch, {"w": torch.full((2,), float(epoch))})
    (tmp_path / "checkpoints" / "epoch=9").mkdir()  # a folder without a finished file
    (tmp_path / "checkpoints" / "epoch=9" / ".model.safetensors.tmp").write_bytes(b"half")
    (tmp_path / "checkpoints" / "notes").mkdir()
    assert checkpoint_epochs(tmp_path) == [0, 5, 12]
    assert checkpoint_epochs(tmp_path / "nowhere") == []
    assert torch.equal(read_checkpoint(tmp_path, -1)["w"], torch.full((2,), 12.0))
    assert torch.equal(read_checkpoint(tmp_path, -3)["w"], torch.zeros(2))
    assert [p.parent.name for p in (tmp_path / "checkpoints").rglob(".*")] == [
        "epoch=9"
    ]  # only the planted one


def test_overwrite_replaces_and_leaves_no_temporary(tmp_path):
    write_checkpoint(tmp_path, 2, {"w": torch.zeros(3)})
    write_checkpoint(tmp_path, 2, {"w": torch.ones(3)})
    assert torch.equal(read_checkpoint(tmp_path, 2)["w"], torch.ones(3))
    assert sorted(p.name for p in checkpoint_path(tmp_path, 2).parent.iterdir()) == ["model.safetensors"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, 4, {"w": torch.zeros(3)})
    import safetensors.torch as st

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path, 4, {"w": torch.ones(3)})
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path, 6, {"w": torch.ones(3)})
    assert torch.equal(read_checkpoint(tmp_path, 4)["w"], torch.zeros(3))
    assert checkpoint_epochs(tmp_path) == [4]
    assert not list((tmp_path / "checkpoints").rglob(".*"))


def test_missing_epoch_names_the_ones_there(tmp_path):
    with pytest.raises(
        KeyError, match=r"epoch 3 .*none \(record with NetworkTrace\(\.\.\., record_checkpoints=True\)\)"
    ):
        read_checkpoint(tmp_path, 3)
    write_checkpoint(tmp_path, 0, {"w": torch.zeros(1)})
    write_checkpoint(tmp_path, 10, {"w": torch.zeros(1)})
    with pytest.raises(KeyError, match="epoch 3 .*epochs with checkpoints: 0, 10"):
        read_checkpoint(tmp_path, 3)
    with pytest.raises(KeyError, match="epochs with checkpoints: 0, 10"):
        read_checkpoint(tmp_path, -3)


def test_damaged_file_is_a_clear_error(tmp_path):
    write_checkpoint(tmp_path, 0, {"w": torch.zeros(4)})
    path = checkpoint_path(tmp_path, 0)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="damaged or not a safetensors file"):
        read_checkpoint(tmp_path, 0)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="non-negative int"):
        write_checkpoint(tmp_path, -1, {"w": torch.zeros(1)})
    with pytest.raises(TypeError, match="not tensors: w"):
        write_checkpoint(tmp_path, 0, {"w": [1.0]})
    with pytest.raises(TypeError, match="must be an int"):
        read_checkpoint(tmp_path, "3")


def test_accepts_a_loaded_trace(tmp_path):
    class FakeTrace:
        path = tmp_path

    write_checkpoint(FakeTrace(), 1, {"w": torch.ones(2)})
    assert checkpoint_epochs(FakeTrace()) == [1] == checkpoint_epochs(str(tmp_path))
    assert checkpoints.checkpoint_path(FakeTrace(), 1).is_file()
