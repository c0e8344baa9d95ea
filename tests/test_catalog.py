"""Tests for nn_staining.catalog: meta.json validation (each branch's exact message), its size bound,
the epoch and metrics logs (torn last line vs damaged middle line) and the atomic writers, on
hand-written files."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from nn_staining import catalog
from nn_staining.catalog import (
    MAX_EPOCH,
    MAX_LOG_BYTES,
    MAX_META_BYTES,
    Commit,
    NotATraceError,
    TraceCorruptError,
    append_line,
    commit_line,
    new_run_id,
    read_commits,
    read_meta,
    read_metrics,
    rewrite_log,
    validate_meta,
    write_json_atomic,
)

#: A valid meta.json as NetworkTrace writes it, reduced to what readers rely on: a Linear (3 neurons,
#: 2 inputs), a ReLU (3) and a Linear (2 neurons, 3 inputs); two row layouts.
META = {
    "format": "nn_staining.trace",
    "format_version": 2,
    "run_id": "0123abcd",
    "layers": [
        {
            "key": "L_0",
            "neurons": 3,
            "kind": "features",
            "in_features": 2,
            "row_offset": 0,
            "input_offset": 0,
        },
        {"key": "L_1", "neurons": 3, "kind": "channels", "in_features": None, "row_offset": 3},
        {
            "key": "L_2",
            "neurons": 2,
            "kind": "features",
            "in_features": 3,
            "row_offset": 6,
            "input_offset": 2,
        },
    ],
    "num_neurons": 8,
    "num_classes": 2,
    "class_names": None,
    "layouts": [
        {"neurons": ["L_0", "L_1", "L_2"], "inputs": ["L_0", "L_2"]},
        {"neurons": ["L_2"], "inputs": []},
    ],
    "config": {"drop_batches": True},
}
PATH = Path("/store/meta.json")


def meta_with(change) -> dict:
    meta = copy.deepcopy(META)
    change(meta)
    return meta


def message(meta: dict) -> str:
    with pytest.raises(TraceCorruptError) as info:
        validate_meta(meta, PATH)
    return str(info.value)


def damaged(field_and_problem: str) -> str:
    return f"'/store/meta.json': {field_and_problem}; the metadata is damaged"


def test_the_valid_meta_passes_and_optional_fields_may_be_absent() -> None:
    validate_meta(copy.deepcopy(META), PATH)

    def drop_optional(m):
        for key in ("num_neurons", "num_classes", "class_names", "config"):
            m.pop(key)

    validate_meta(meta_with(drop_optional), PATH)
    validate_meta(meta_with(lambda m: m.update(num_classes=1, class_names=["a"], layouts=[])), PATH)

    def empty_layer(m):
        m["layers"][1]["neurons"] = 0
        m["layers"][2]["row_offset"] = 3
        m["num_neurons"] = 5

    validate_meta(meta_with(empty_layer), PATH)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda m: m.pop("format_version"),
            "format_version is None; this nn_staining reads versions 2, 3 (re-record it)",
        ),
        (
            lambda m: m.update(format_version=1),
            "format_version is 1; this nn_staining reads versions 2, 3 (re-record it)",
        ),
        (
            lambda m: m.update(format_version=4),
            "format_version is 4; this nn_staining reads versions 2, 3 "
            "(the trace was written by a newer nn_staining: upgrade it)",
        ),
        (lambda m: m.update(layers={"L_0": {}}), "layers must be a list, not dict"),
        (lambda m: m["layers"].insert(1, ["L_x"]), "layers[1] must be an object"),
        (lambda m: m["layers"][0].update(key=7), "layers[0].key 7 is not a new layer key L_<name>"),
        (lambda m: m["layers"][1].update(key="relu"), "layers[1].key 'relu' is not a new layer key L_<name>"),
        (lambda m: m["layers"][2].update(key="L_0"), "layers[2].key 'L_0' is not a new layer key L_<name>"),
        (lambda m: m["layers"][0].pop("neurons"), "layers[0].neurons None is not a count"),
        (lambda m: m["layers"][0].update(neurons=-1), "layers[0].neurons -1 is not a count"),
        (lambda m: m["layers"][0].update(neurons=True), "layers[0].neurons True is not a count"),
        (lambda m: m["layers"][0].update(neurons=3.0), "layers[0].neurons 3.0 is not a count"),
        (
            lambda m: m["layers"][1].update(kind="neurons"),
            "layers[1].kind 'neurons' is not 'features' or 'channels'",
        ),
        (
            lambda m: m["layers"][1].update(row_offset=0),
            "layers[1].row_offset is 0 but the layers before hold 3",
        ),
        (
            lambda m: m["layers"][0].pop("row_offset"),
            "layers[0].row_offset is None but the layers before hold 0",
        ),
        (
            lambda m: m["layers"][2].update(row_offset=5),
            "layers[2].row_offset is 5 but the layers before hold 6",
        ),
        (lambda m: m["layers"][0].update(in_features="2"), "layers[0].in_features '2' is not a count"),
        (lambda m: m["layers"][0].update(in_features=-2), "layers[0].in_features -2 is not a count"),
        (
            lambda m: m["layers"][1].update(input_offset=2),
            "layers[1].input_offset is 2 but the inputs before hold 2",
        ),
        (
            lambda m: m["layers"][2].update(input_offset=0),
            "layers[2].input_offset is 0 but the inputs before hold 2",
        ),
        (lambda m: m.update(num_neurons=9), "num_neurons is 9 but the layers hold 8"),
        (lambda m: m.update(num_neurons=None), "num_neurons is None but the layers hold 8"),
        (lambda m: m.update(num_classes=0), "num_classes 0 is not a positive count"),
        (lambda m: m.update(num_classes=2.0), "num_classes 2.0 is not a positive count"),
        (lambda m: m.update(config=[]), "config has the wrong type (list)"),
        (lambda m: m.update(class_names="ab"), "class_names has the wrong type (str)"),
        (lambda m: m.pop("layouts"), "layouts must list the layer keys of each row layout"),
        (lambda m: m.update(layouts=[["L_0"]]), "layouts must list the layer keys of each row layout"),
        (lambda m: m["layouts"][1].pop("inputs"), "layouts must list the layer keys of each row layout"),
        (
            lambda m: m["layouts"][1].update(neurons="L_2"),
            "layouts must list the layer keys of each row layout",
        ),
        (
            lambda m: m["layouts"][1].update(inputs=["L_9"]),
            "layouts must list the layer keys of each row layout",
        ),
        (
            lambda m: m["layouts"][0].update(neurons=["L_0", "L_3"]),
            "layouts must list the layer keys of each row layout",
        ),
        (lambda m: m.pop("run_id"), "run_id is missing"),
        (lambda m: m.update(run_id=12), "run_id is missing"),
    ],
)
def test_each_damaged_field_has_its_own_message(change, expected: str) -> None:
    assert message(meta_with(change)) == damaged(expected)


def test_later_input_offsets_follow_the_layers_with_inputs() -> None:
    """The input offsets count only layers that record inputs: an activation's entry adds nothing."""
    more = meta_with(
        lambda m: (
            m["layers"].append(
                {
                    "key": "L_3",
                    "neurons": 1,
                    "kind": "features",
                    "in_features": 2,
                    "row_offset": 8,
                    "input_offset": 5,
                }
            )
            or m.update(num_neurons=9)
        )
    )
    validate_meta(more, PATH)
    more["layers"][3]["input_offset"] = 3
    assert message(more) == damaged("layers[3].input_offset is 3 but the inputs before hold 5")


# -- read_meta ------------------------------------------------------------------------------------------
def write_meta(root: Path, meta: dict | str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "meta.json"
    path.write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return path


def test_read_meta_returns_the_validated_content(tmp_path: Path) -> None:
    write_meta(tmp_path, META)
    assert read_meta(tmp_path) == META
    assert read_meta(str(tmp_path)) == META


def test_read_meta_errors_for_what_is_not_a_trace(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        read_meta(tmp_path / "gone")
    assert str(info.value) == f"no trace at {str(tmp_path / 'gone')!r}: the path does not exist"
    not_a_trace = (
        f"{str(tmp_path)!r} is not an nn_staining trace: expected a folder with meta.json and "
        "neurons/, classes/, … as written by NetworkTrace"
    )
    with pytest.raises(NotATraceError) as info:
        read_meta(tmp_path)
    assert str(info.value) == not_a_trace
    (tmp_path / "file").write_text("{}")
    with pytest.raises(NotATraceError, match="/file' is not an nn_staining trace: expected a folder"):
        read_meta(tmp_path / "file")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"format": "nn_staining.trace"', "is not valid JSON: "),
        (b'{"format": "\xff"}', "is not valid JSON: 'utf-8' codec can't decode byte 0xff"),
        ('{"format": "other.trace"}', "is not an nn_staining trace (format 'other.trace')"),
        ("{}", "is not an nn_staining trace (format None)"),
        ("[1, 2]", "is not an nn_staining trace (format 'list')"),
        ('"nn_staining.trace"', "is not an nn_staining trace (format 'str')"),
    ],
)
def test_foreign_or_garbled_meta_is_not_a_trace(tmp_path: Path, content, expected: str) -> None:
    path = tmp_path / "meta.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(NotATraceError) as info:
        read_meta(tmp_path)
    assert str(info.value).startswith(f"{str(path)!r} {expected}")


def test_read_meta_validates(tmp_path: Path) -> None:
    write_meta(tmp_path, meta_with(lambda m: m.update(num_classes=-1)))
    with pytest.raises(TraceCorruptError, match=r"meta.json': num_classes -1 is not a positive count"):
        read_meta(tmp_path)


def test_meta_json_size_bound_is_32_mib_inclusive(tmp_path: Path) -> None:
    """A meta.json of exactly 32 MiB loads (padded with JSON whitespace); one byte more is refused unread."""
    assert MAX_META_BYTES == 32 * 2**20
    text = json.dumps(META)
    path = write_meta(tmp_path, text + " " * (MAX_META_BYTES - len(text)))
    assert path.stat().st_size == MAX_META_BYTES
    assert read_meta(tmp_path) == META
    with open(path, "a") as f:
        f.write(" ")
    with pytest.raises(TraceCorruptError) as info:
        read_meta(tmp_path)
    assert str(info.value) == (
        f"{str(path)!r} (meta.json) is 33,554,433 bytes, more than the 33,554,432 a trace's meta.json may take"
    )


def test_a_meta_json_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "meta.json")
    with pytest.raises(TraceCorruptError) as info:
        read_meta(tmp_path)
    assert str(info.value) == f"{str(tmp_path / 'meta.json')!r} (meta.json) is not a regular file"


# -- the logs -------------------------------------------------------------------------------------------
COMMITS = [
    {"epoch": 0, "phase": "train", "layout": 0, "rows": {"neurons": 8, "classes": 16}},
    {"epoch": 0, "phase": "eval", "layout": 1, "rows": {"neurons": 2}},
    {"epoch": 3, "phase": "train", "layout": 1, "rows": {"neurons": 2, "classes": 0}},
]


def write_log(root: Path, name: str, lines: list, tail: str = "") -> Path:
    path = root / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines) + tail)
    return path


def test_read_commits_by_phase(tmp_path: Path) -> None:
    write_log(tmp_path, "epochs.jsonl", COMMITS)
    assert read_commits(tmp_path, META) == {
        "train": {
            0: Commit(0, "train", 0, {"neurons": 8, "classes": 16}),
            3: Commit(3, "train", 1, {"neurons": 2, "classes": 0}),
        },
        "eval": {0: Commit(0, "eval", 1, {"neurons": 2})},
    }
    assert read_commits(tmp_path / "none", META) == {"train": {}, "eval": {}}, "no log yet: no epochs"


def test_a_later_commit_of_the_same_epoch_wins(tmp_path: Path) -> None:
    write_log(tmp_path, "epochs.jsonl", [COMMITS[0], dict(COMMITS[0], layout=1)])
    assert read_commits(tmp_path, META)["train"] == {0: Commit(0, "train", 1, COMMITS[0]["rows"])}


def test_a_torn_last_line_is_no_commit(tmp_path: Path) -> None:
    write_log(tmp_path, "epochs.jsonl", COMMITS[:2], tail='{"epoch": 3, "phase": "train", "lay')
    commits = read_commits(tmp_path, META)
    assert sorted(commits["train"]) == [0] and sorted(commits["eval"]) == [0]
    # even a complete object without its newline was still being written
    write_log(tmp_path, "epochs.jsonl", COMMITS[:2], tail=json.dumps(COMMITS[2]))
    assert sorted(read_commits(tmp_path, META)["train"]) == [0]


def test_a_malformed_middle_line_is_an_error_naming_it(tmp_path: Path) -> None:
    path = write_log(tmp_path, "epochs.jsonl", [COMMITS[0], '{"epoch": 1, "pha', COMMITS[2]])
    with pytest.raises(TraceCorruptError) as info:
        read_commits(tmp_path, META)
    assert str(info.value).startswith(f"{str(path)!r} line 2 is not JSON: ")
    path = write_log(tmp_path, "epochs.jsonl", [COMMITS[0], COMMITS[1], "[3]"])
    with pytest.raises(TraceCorruptError) as info:
        read_commits(tmp_path, META)
    assert str(info.value) == f"{str(path)!r} line 3 is not an object"
    write_log(tmp_path, "epochs.jsonl", [COMMITS[0], ""])
    with pytest.raises(TraceCorruptError, match="line 2 is not JSON"):
        read_commits(tmp_path, META)
    # two objects on one line parse as two in the one-pass read of the log: still line 2's error
    write_log(tmp_path, "epochs.jsonl", [COMMITS[0], json.dumps(COMMITS[1]) + "," + json.dumps(COMMITS[2])])
    with pytest.raises(TraceCorruptError, match="line 2 is not JSON: Extra data"):
        read_commits(tmp_path, META)


@pytest.mark.parametrize(
    "change",
    [
        {"epoch": -1},
        {"epoch": True},
        {"epoch": "0"},
        {"epoch": MAX_EPOCH + 1},
        {"phase": "test"},
        {"layout": 2},  # META has two layouts
        {"layout": -1},
        {"layout": None},
        {"rows": [8]},
        {"rows": {"neurons": -8}},
        {"rows": {"neurons": 8.0}},
    ],
)
def test_an_invalid_commit_line_is_an_error(tmp_path: Path, change: dict) -> None:
    line = dict(COMMITS[1], **change)
    path = write_log(tmp_path, "epochs.jsonl", [COMMITS[0], line])
    with pytest.raises(TraceCorruptError) as info:
        read_commits(tmp_path, META)
    assert str(info.value) == f"{str(path)!r} line 2 is not a valid epoch commit: {line!r}"


def test_commit_limits_are_inclusive(tmp_path: Path) -> None:
    line = {"epoch": MAX_EPOCH, "phase": "train", "layout": 1, "rows": {}}
    write_log(tmp_path, "epochs.jsonl", [line])
    assert read_commits(tmp_path, META)["train"] == {MAX_EPOCH: Commit(MAX_EPOCH, "train", 1, {})}
    assert MAX_EPOCH == 2**31 - 1


def test_an_invalid_commit_line_is_quoted_up_to_200_characters(tmp_path: Path) -> None:
    line = dict(COMMITS[0], phase="x" * 300)
    path = write_log(tmp_path, "epochs.jsonl", [line])
    with pytest.raises(TraceCorruptError) as info:
        read_commits(tmp_path, META)
    prefix = f"{str(path)!r} line 1 is not a valid epoch commit: "
    assert str(info.value) == prefix + repr(line)[:200]


def test_a_log_over_its_bound_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "epochs.jsonl"
    with open(path, "wb") as f:
        f.truncate(MAX_LOG_BYTES + 1)  # sparse
    assert MAX_LOG_BYTES == 512 * 2**20
    with pytest.raises(TraceCorruptError) as info:
        read_commits(tmp_path, META)
    assert str(info.value) == (
        f"{str(path)!r} (epoch log) is 536,870,913 bytes, more than the 536,870,912 a trace's epoch log may take"
    )


def test_read_metrics_later_lines_win_and_odd_lines_are_skipped(tmp_path: Path) -> None:
    meta = dict(META, metrics={"run": {"acc": 0.5}, "1": {"loss": 9.0}})
    write_log(
        tmp_path,
        "metrics.jsonl",
        [
            {"key": "0", "values": {"loss": 2.0, "acc": 0.1}},
            {"key": "1", "values": {"loss": 1.5}},
            {"key": 2, "values": {"loss": 7.0}},
            {"key": "2", "values": [1]},
            {"values": {"loss": 7.0}},
            {"key": "0", "values": {"loss": 1.0}},
            {"key": "run", "values": {"confusion": [[1, 0], [0, 1]]}},
        ],
        tail='{"key": "3", "values": {"loss"',
    )
    assert read_metrics(tmp_path, meta) == {
        "run": {"acc": 0.5, "confusion": [[1, 0], [0, 1]]},
        "0": {"loss": 1.0, "acc": 0.1},
        "1": {"loss": 1.5},
    }
    assert meta["metrics"] == {"run": {"acc": 0.5}, "1": {"loss": 9.0}}, "the meta's metrics are not changed"
    assert read_metrics(tmp_path / "none", META) == {}
    write_log(tmp_path, "metrics.jsonl", ["{oops", {"key": "0", "values": {}}])
    with pytest.raises(TraceCorruptError, match="metrics.jsonl' line 1 is not JSON"):
        read_metrics(tmp_path, META)


# -- writing --------------------------------------------------------------------------------------------
def test_append_line_and_commit_line_write_compact_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "epochs.jsonl"
    commit = Commit(4, "eval", 1, {"neurons": 2, "classes": 4})
    assert commit_line(commit) == {
        "epoch": 4,
        "phase": "eval",
        "layout": 1,
        "rows": {"neurons": 2, "classes": 4},
    }
    append_line(path, commit_line(commit))
    append_line(path, commit_line(Commit(5, "eval", 0, {})))
    assert path.read_text(encoding="utf-8") == (
        '{"epoch":4,"phase":"eval","layout":1,"rows":{"neurons":2,"classes":4}}\n'
        '{"epoch":5,"phase":"eval","layout":0,"rows":{}}\n'
    )
    assert read_commits(tmp_path, META)["eval"] == {4: commit, 5: Commit(5, "eval", 0, {})}
    metrics = tmp_path / "metrics.jsonl"
    append_line(metrics, {"key": "run", "values": {"é": 1}})
    assert metrics.read_text(encoding="utf-8") == '{"key":"run","values":{"\\u00e9":1}}\n'


def test_rewrite_log_replaces_the_lines(tmp_path: Path) -> None:
    path = write_log(tmp_path, "epochs.jsonl", COMMITS)
    rewrite_log(path, COMMITS[:1] + [{"a": 1}])
    assert path.read_text() == (
        '{"epoch":0,"phase":"train","layout":0,"rows":{"neurons":8,"classes":16}}\n{"a":1}\n'
    )
    rewrite_log(path, [])
    assert path.read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epochs.jsonl"], "no temporary left"


@pytest.mark.parametrize("writer", ["json", "log"])
def test_a_failed_replace_keeps_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    path = tmp_path / "target"
    path.write_text("old")

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(catalog.os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        if writer == "json":
            write_json_atomic(path, {"a": 1})
        else:
            rewrite_log(path, [{"a": 1}])
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_write_json_atomic_writes_through_a_dot_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "meta.json"
    moves = []
    real = os.replace

    def spy(src, dst):
        moves.append((Path(src).name, Path(dst).name))
        real(src, dst)

    monkeypatch.setattr(catalog.os, "replace", spy)
    write_json_atomic(path, {"b": [1, 2], "a": None})
    assert moves == [(".meta.json.tmp", "meta.json")]
    assert json.loads(path.read_text()) == {"b": [1, 2], "a": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_new_run_ids_are_fresh_hex() -> None:
    ids = {new_run_id() for _ in range(20)}
    assert len(ids) == 20
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


@pytest.mark.parametrize("writer", [write_json_atomic, lambda path, payload: rewrite_log(path, [payload])])
def test_an_unserialisable_payload_raises_its_own_error_and_writes_nothing(tmp_path: Path, writer) -> None:
    """The JSON error surfaces (no FileNotFoundError from cleaning up a temporary never written)."""
    with pytest.raises(TypeError, match="not JSON serializable"):
        writer(tmp_path / "meta.json", {"a": object()})
    assert list(tmp_path.iterdir()) == []


# -- the layer graph (inputs_from, input_ops, elementwise), when a layer records it ----------------------
def with_graph(**entry) -> dict:
    """META whose L_1 (the ReLU) records where its input comes from."""
    return meta_with(lambda m: m["layers"][1].update(entry))


def test_a_recorded_layer_graph_passes() -> None:
    validate_meta(with_graph(inputs_from=["L_0"], input_ops=[["relu"]], elementwise=True), PATH)
    validate_meta(with_graph(inputs_from=[], input_ops=[], elementwise=False), PATH)
    # a source may be a later layer: the graph is checked against every key of the trace
    validate_meta(
        with_graph(inputs_from=["L_2", "L_0"], input_ops=[[], ["add", "mul"]], elementwise=False), PATH
    )


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"inputs_from": "L_0"}, "layers[1].inputs_from 'L_0' is not a list of the trace's layer keys"),
        ({"inputs_from": ["L_9"]}, "layers[1].inputs_from ['L_9'] is not a list of the trace's layer keys"),
        (
            {"inputs_from": ["L_0", 0]},
            "layers[1].inputs_from ['L_0', 0] is not a list of the trace's layer keys",
        ),
        ({"inputs_from": ["L_0"]}, "layers[1].input_ops None is not one list of operation names per source"),
        (
            {"inputs_from": ["L_0"], "input_ops": [["relu"], []]},
            "layers[1].input_ops [['relu'], []] is not one list of operation names per source",
        ),
        (
            {"inputs_from": ["L_0"], "input_ops": ["relu"]},
            "layers[1].input_ops ['relu'] is not one list of operation names per source",
        ),
        (
            {"inputs_from": ["L_0"], "input_ops": [["relu", 3]]},
            "layers[1].input_ops [['relu', 3]] is not one list of operation names per source",
        ),
        (
            {"inputs_from": ["L_0"], "input_ops": {}},
            "layers[1].input_ops {} is not one list of operation names per source",
        ),
        ({"inputs_from": ["L_0"], "input_ops": [[]]}, "layers[1].elementwise None is not true or false"),
        (
            {"inputs_from": ["L_0"], "input_ops": [[]], "elementwise": 1},
            "layers[1].elementwise 1 is not true or false",
        ),
    ],
)
def test_each_damaged_graph_field_has_its_own_message(entry: dict, expected: str) -> None:
    assert message(with_graph(**entry)) == damaged(expected)


def test_a_long_damaged_graph_field_is_quoted_up_to_200_characters() -> None:
    sources = [f"L_missing_{i}" for i in range(40)]
    assert message(with_graph(inputs_from=sources)) == damaged(
        f"layers[1].inputs_from {repr(sources)[:200]} is not a list of the trace's layer keys"
    )
    ops = [["op"] * 50]
    assert message(with_graph(inputs_from=["L_0", "L_2"], input_ops=ops)) == damaged(
        f"layers[1].input_ops {repr(ops)[:200]} is not one list of operation names per source"
    )


def test_reading_a_log_allocates_about_its_size_not_the_limit(tmp_path) -> None:
    """f.read(limit + 1) allocated the whole 512 MiB limit up front for every epochs.jsonl read."""
    import tracemalloc

    from nn_staining import catalog

    log = tmp_path / "epochs.jsonl"
    log.write_text("x" * 3_000_000)
    tracemalloc.start()
    try:
        text = catalog._bounded_text(log, catalog.MAX_LOG_BYTES, "the epoch log")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert text == "x" * 3_000_000
    assert peak < 32 * 2**20
