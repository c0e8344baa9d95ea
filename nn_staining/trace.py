"""A loaded trace: nested ``E_/L_/n_`` views, signature queries and DataFrames.

Nothing is read at load time but ``meta.json`` and the epoch and index logs; each query turns its
signature into the epoch parts (or, for many epochs of ``neurons``, the history-index blocks) and
row ranges it needs and reads only those row groups and columns.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds

from .catalog import (
    EPOCH_LOG,
    META,
    TraceChangedError,
    TraceCorruptError,
    read_commits,
    read_index,
    read_metrics,
)
from .rows import ReadPlan, RowLayout
from .signature import Signature, epoch_key, is_glob, layer_key, neuron_key, parse_key, parse_signature
from .store import (
    INDEX_COLUMNS,
    INDEXED_COLUMNS,
    PHASES,
    SCHEMAS,
    BlockRead,
    part_name,
    read_epochs,
    read_meta,
    store_size,
)

#: A history-index block serves a query when it reads at most this many times the selected epochs' rows.
MAX_BLOCK_OVERREAD = 8

#: Columns returned when none are asked for (``weights`` is a list per neuron: ask for it).
DEFAULT_COLUMNS = {
    table: [f.name for f in schema if f.name not in ("phase", "weights")] for table, schema in SCHEMAS.items()
}


def load_trace(path: str | os.PathLike, phase: str = "train") -> Trace:
    """Open the trace at ``path`` for one ``phase`` (only ``meta.json`` and the epoch log are read now)."""
    return Trace(path, phase=phase)


class Trace(Mapping):
    """A recorded trace; ``t["E_3"]["L_hidden_1"]["n_20"]`` or ``t["E_3/L_hidden_1/n_20"]``."""

    def __init__(self, path: str | os.PathLike, phase: str = "train") -> None:
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r} is not one of {', '.join(PHASES)}")
        self.path = Path(path)
        self._meta_stat = _stat(self.path / META)
        self.meta = read_meta(self.path)
        self.phase = phase
        self._layers = {info["key"]: info for info in self.meta["layers"]}
        classes = self.meta.get("num_classes")
        self._rows = RowLayout(self.meta["layers"], classes)
        self._layouts = [
            RowLayout(self.meta["layers"], classes, lay["neurons"], lay["inputs"])
            for lay in self.meta["layouts"]
        ]
        commits = read_commits(self.path, self.meta)
        self._commits = commits[phase]
        self._blocks = read_index(self.path, self.meta, commits)[phase]
        self._metrics: dict[str, dict[str, Any]] | None = None

    # -- what is recorded ------------------------------------------------------------------------
    @property
    def epochs(self) -> list[int]:
        """The completed, recorded epochs of this phase."""
        return sorted(self._commits)

    @property
    def run_id(self) -> str:
        """The id of the recording this trace comes from (a re-recording gets a new one)."""
        return self.meta["run_id"]

    @property
    def layers(self) -> list[str]:
        """Layer keys in model order, e.g. ``["L_input", "L_hidden_1", "L_output"]``."""
        return list(self._layers)

    def layer_info(self, layer: str) -> dict[str, Any]:
        """The layer's entry in ``meta.json`` (module type, neuron count, parameter shapes…)."""
        return self._layers[self._check_layer(layer)]

    @property
    def num_classes(self) -> int | None:
        """Classes of the per-class statistics (None when no labels were given)."""
        return self.meta.get("num_classes")

    @property
    def class_names(self) -> list[str]:
        """Names of the classes (their indices as text when none were given)."""
        names = self.meta.get("class_names")
        return list(names) if names else [str(c) for c in range(self.num_classes or 0)]

    @property
    def metrics(self) -> pd.DataFrame:
        """Per-epoch training metrics given to ``NetworkTrace.log_metrics`` (index: epoch)."""
        rows = {int(e): v for e, v in self._all_metrics().items() if e != "run"}
        if not rows:
            return pd.DataFrame(index=pd.Index([], name="epoch"))
        frame = pd.DataFrame.from_dict(rows, orient="index").sort_index()
        frame.index.name = "epoch"
        return frame

    @property
    def run_metrics(self) -> dict[str, Any]:
        """Run-level metrics given to ``log_metrics`` without an epoch (e.g. the final confusion matrix)."""
        return dict(self._all_metrics().get("run", {}))

    def _all_metrics(self) -> dict[str, dict[str, Any]]:
        if self._metrics is None:
            self._metrics = read_metrics(self.path, self.meta)
        return self._metrics

    @property
    def feature_names(self) -> list[str] | None:
        """Names of the model's input features, when the recording gave them (``config={"feature_names": …}``)."""
        names = self.meta.get("config", {}).get("feature_names")
        return list(names) if names else None

    def size_bytes(self) -> int:
        """Bytes the store takes on disk."""
        return store_size(self.path)

    def __repr__(self) -> str:
        return (
            f"Trace({str(self.path)!r}, phase={self.phase!r}, epochs={_short(self.epochs)}, "
            f"layers={self.layers})"
        )

    # -- Mapping over epochs ---------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        return (epoch_key(e) for e in self.epochs)

    def __len__(self) -> int:
        return len(self.epochs)

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # noqa: B018
        except (KeyError, ValueError, TypeError):
            return False
        return True

    def __getitem__(self, signature: str) -> Any:
        """A cell's metrics (dict), an epoch or layer view (mapping), or a DataFrame for wildcards."""
        sig = parse_signature(signature)
        epochs = self._epochs(sig)
        if not sig.epochs.is_single:
            return self.query(sig)
        epoch = epochs[0]
        if sig.layer is None:
            return EpochView(self, epoch)
        if is_glob(sig.layer) and sig.layer not in self._layers:
            return self.query(sig)
        layer = self._check_layer(sig.layer)
        if sig.neurons is None:
            return LayerView(self, epoch, layer)
        if not sig.neurons.is_single:
            return self.query(sig)
        neuron = sig.neurons.values[0]
        return LayerView(self, epoch, layer)[neuron_key(neuron)]

    # -- queries ---------------------------------------------------------------------------------
    def query(
        self, signature: str | Signature, columns: Sequence[str] | None = None, table: str = "neurons"
    ) -> pd.DataFrame:
        """The rows a signature selects, indexed by (epoch, layer, neuron[, class]).

        ``table`` is ``neurons`` (default), ``classes``, ``inputs`` (indexed by feature) or
        ``batches``; ``columns`` picks metrics (``weights`` must be asked for).
        """
        sig = parse_signature(signature) if isinstance(signature, str) else signature
        if table not in SCHEMAS:
            raise ValueError(f"table {table!r} is not one of {', '.join(SCHEMAS)}")
        if table == "batches" and not (self.path / "batches").exists():
            raise KeyError(
                f"{str(self.path)!r} has no batches table; record with drop_batches=False (main.py --keep-batches)"
            )
        epochs = self._epochs(sig)
        layers = self._select_layers(sig)
        columns = self._columns(table, columns)
        if table != "batches":
            self._rows.check_selection(layers, sig.neurons)
        read_columns = list(dict.fromkeys(INDEX_COLUMNS[table] + columns))
        blocks: list[BlockRead] = []
        if table == "neurons" and set(read_columns) <= set(INDEXED_COLUMNS):
            blocks, epochs = self._block_reads(epochs, layers, sig)
        plans = self._plans(table, epochs, layers, sig)
        data = read_epochs(self.path, table, plans, self.phase, read_columns, blocks)
        return _to_frame(data, table, columns)

    def to_dataframe(self, columns: Sequence[str] | None = None, table: str = "neurons") -> pd.DataFrame:
        """The whole table (every epoch, layer and neuron) as a MultiIndex DataFrame."""
        return self.query("E_*/L_*", columns=columns, table=table)

    def classes(self, signature: str = "E_*/L_*", columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Per-class statistics, indexed by (epoch, layer, neuron, class)."""
        return self.query(signature, columns=columns, table="classes")

    def inputs(self, signature: str = "E_*/L_*") -> pd.DataFrame:
        """Class-conditional input means of ``nn.Linear`` layers, indexed by (epoch, layer, feature, class)."""
        return self.query(signature, table="inputs")

    def batches(self, signature: str = "E_*/L_*", columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Per-batch statistics (recorded with ``drop_batches=False``)."""
        return self.query(signature, columns=columns, table="batches")

    def weights(self, epoch: int, layer: str) -> np.ndarray:
        """The layer's incoming weight matrix (neurons, inputs) at ``epoch``."""
        layer = self._check_layer(layer)
        frame = self.query(f"E_{epoch}/{layer}", columns=["weights"])
        if frame.empty or frame["weights"].isna().all():
            raise KeyError(f"layer {layer!r} has no recorded weights at epoch {epoch}")
        return np.stack(frame["weights"].to_numpy())

    def to_dict(self, signature: str = "E_*/L_*", columns: Sequence[str] | None = None) -> dict[str, Any]:
        """The nested ``{"E_3": {"L_x": {"n_0": {metric: value}}}}`` dict of a selection."""
        frame = self.query(signature, columns=columns)
        out: dict[str, Any] = {}
        for (epoch, layer, neuron), row in zip(frame.index, frame.to_dict("records")):
            out.setdefault(epoch_key(epoch), {}).setdefault(layer, {})[neuron_key(neuron)] = _plain(row)
        return out

    # -- the probe set (NetworkTrace(..., probe=(x, y))) -----------------------------------------
    def probe(self, epoch: int, layer: str) -> np.ndarray:
        """The probe samples' activations ``(n, neurons)`` of ``layer`` at ``epoch`` (fewer columns when the
        byte budget subsampled them: ``probes.read_probe_neurons`` names them)."""
        from .probes import read_probe

        return read_probe(self.path, self.meta, epoch, self._check_layer(layer))

    def probe_gram(self, epoch: int, layer: str) -> np.ndarray:
        """The probe Gram matrix ``R Rᵀ`` (n × n, float64) of ``layer`` at ``epoch``, kept whatever its width."""
        from .probes import read_probe_gram

        return read_probe_gram(self.path, self.meta, epoch, self._check_layer(layer))

    @property
    def probe_labels(self) -> np.ndarray:
        """The probe set's class labels ``(n,)``."""
        from .probes import probe_info

        return np.asarray(probe_info(self.meta)["labels"], dtype=np.int64)

    def _plans(
        self, table: str, epochs: list[int], layers: list[str], sig: Signature
    ) -> list[tuple[int, ReadPlan]]:
        """Each selected epoch's read plan, from the row layout it committed; the committed row counts
        must agree with the layout (tampered metadata is an error, never another layer's rows)."""
        self._check_unchanged()
        plans = []
        by_layout: dict[int, ReadPlan | None] = {}
        for epoch in epochs:
            commit = self._commits[epoch]
            if table not in commit.rows:
                continue  # this epoch has no part of the table (e.g. no labels, no classes)
            if commit.layout not in by_layout:
                by_layout[commit.layout] = self._layouts[commit.layout].plan(table, layers, sig.neurons)
            plan = by_layout[commit.layout]
            if plan is None:
                continue  # none of the layers fired in this epoch
            committed = commit.rows[table]
            if plan.expected_rows is not None and plan.expected_rows != committed:
                raise TraceCorruptError(
                    f"epoch {epoch}: meta.json's layers make {plan.expected_rows:,} {table} rows but the epoch "
                    f"committed {committed:,} ({str(self.path / EPOCH_LOG)!r}); the metadata is damaged"
                )
            plans.append((epoch, ReadPlan(plan.row_ranges, committed, plan.fallback)))
        return plans

    def _block_reads(
        self, epochs: list[int], layers: list[str], sig: Signature
    ) -> tuple[list[BlockRead], list[int]]:
        """The history-index blocks that serve ``epochs`` well (two or more of a block's epochs, at
        most ``MAX_BLOCK_OVERREAD`` times their rows read), and the epochs left to read from parts."""
        if not self._blocks or len(epochs) < 2:
            return [], epochs
        selected = set(epochs)
        reads, moved = [], set()
        plans: dict[int, ReadPlan | None] = {}
        for block in self._blocks:
            if block.epochs[-1] < epochs[0] or block.epochs[0] > epochs[-1]:
                continue
            positions = [i for i, e in enumerate(block.epochs) if e in selected]
            if len(positions) < 2 or len(positions) * MAX_BLOCK_OVERREAD < len(block.epochs):
                continue
            if block.layout not in plans:
                plans[block.layout] = self._layouts[block.layout].plan("neurons", layers, sig.neurons)
            plan = plans[block.layout]
            if plan is None or plan.row_ranges is None or plan.expected_rows != block.rows:
                continue  # no rows in this layout, or metadata that _plans reports as damaged
            reads.append(BlockRead(block, positions, ReadPlan(plan.row_ranges, block.rows, None)))
            moved.update(block.epochs[i] for i in positions)
        return reads, [e for e in epochs if e not in moved]

    def _check_unchanged(self) -> None:
        """Refuse to answer when the store was re-recorded since this trace was loaded."""
        now = _stat(self.path / META)
        if now == self._meta_stat:
            return
        try:
            run_id = read_meta(self.path)["run_id"] if now is not None else None
        except (OSError, ValueError):
            run_id = None
        if run_id != self.meta["run_id"]:
            raise TraceChangedError(
                f"{str(self.path)!r} was re-recorded (or removed) after this Trace was loaded; "
                "call load_trace again for the new run"
            )
        self._meta_stat = now

    # -- engines ---------------------------------------------------------------------------------
    def part_files(self, table: str = "neurons") -> list[str]:
        """The Parquet parts of ``table`` for this phase's recorded epochs, in epoch order."""
        if table not in SCHEMAS:
            raise ValueError(f"table {table!r} is not one of {', '.join(SCHEMAS)}")
        self._check_unchanged()
        name = part_name(self.phase)
        paths = [
            (e, self.path / table / f"epoch={e}" / name)
            for e in self.epochs
            if table in self._commits[e].rows
        ]
        missing = [str(p) for _, p in paths if not p.is_file()]
        if missing:
            raise TraceCorruptError(f"listed epochs' parts are missing: {', '.join(missing[:5])}")
        return [os.fspath(p) for _, p in paths]

    def dataset(self, table: str = "neurons") -> ds.Dataset:
        """``table`` as a :class:`pyarrow.dataset.Dataset` of this phase's completed epochs, with the
        int32 ``epoch`` column from the hive folder names: hand it to any engine that scans Arrow."""
        files = self.part_files(table)
        schema = SCHEMAS[table].append(pa.field("epoch", pa.int32()))
        if not files:
            return ds.dataset(schema.empty_table())
        partitioning = ds.partitioning(pa.schema([("epoch", pa.int32())]), flavor="hive")
        verified = ds.ParquetFileFormat(
            default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True)
        )
        return ds.dataset(
            files,
            schema=schema,
            format=verified,
            partitioning=partitioning,
            partition_base_dir=os.fspath(self.path / table),
        )

    def sql(self, query: str) -> pd.DataFrame:
        """Run a DuckDB SQL ``query`` over the store's tables (views ``neurons``, ``classes``,
        ``inputs``, ``batches``: this phase's completed epochs, with an ``epoch`` column)."""
        try:
            import duckdb
        except ImportError:
            raise ImportError("Trace.sql needs DuckDB: pip install duckdb") from None
        con = duckdb.connect()
        # DuckDB takes key=value from every folder of a path: under "epoch=9/" or "lr=0.1/" it would
        # give every row epoch 9 or an extra column, so such a store is scanned as the Arrow dataset.
        hive_parents = any("=" in part for part in self.path.parts)
        try:
            for table in SCHEMAS:
                files = self.part_files(table)
                if files and not hive_parents:
                    listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
                    con.execute(
                        f"CREATE VIEW {table} AS SELECT * REPLACE (CAST(epoch AS INTEGER) AS epoch) "
                        f"FROM read_parquet([{listed}], hive_partitioning = true)"
                    )
                else:
                    con.from_arrow(self.dataset(table)).create_view(table)
            return con.execute(query).df()
        finally:
            con.close()

    # -- signature → what to read ----------------------------------------------------------------
    def _epochs(self, sig: Signature) -> list[int]:
        chosen = sig.epochs.select(self.epochs)
        if not chosen:
            hint = (
                " (eval passes are kept only with record_eval=True / --record-eval)"
                if self.phase == "eval"
                else ""
            )
            raise KeyError(
                f"epoch {sig.epochs} not in trace ({self.phase}); recorded epochs: {_short(self.epochs)}{hint}"
            )
        return chosen

    def _check_layer(self, layer: str) -> str:
        """The key of ``layer`` (a key, or a module name as the recorder keys it: 'L_' is 'L_L_')."""
        try:
            key = layer if layer in self._layers else layer_key(layer)
        except ValueError:
            key = layer
        if key not in self._layers:
            raise KeyError(f"layer {layer!r} not in trace; layers: {', '.join(self.layers)}")
        return key

    def _select_layers(self, sig: Signature) -> list[str]:
        if sig.layer is None:
            return self.layers
        hits = sig.matching_layers(self.layers)  # an exact key wins over its glob reading ('L_[x]')
        if not hits and not is_glob(sig.layer):
            return [self._check_layer(sig.layer)]
        if not hits:
            raise KeyError(f"layer pattern {sig.layer!r} matches no layer; layers: {', '.join(self.layers)}")
        return hits

    def _columns(self, table: str, columns: Sequence[str] | None) -> list[str]:
        if columns is None:
            return [c for c in DEFAULT_COLUMNS[table] if c not in INDEX_COLUMNS[table]]
        if isinstance(columns, str):
            columns = [columns]
        valid = [f.name for f in SCHEMAS[table] if f.name not in INDEX_COLUMNS[table]]
        bad = [c for c in columns if c not in valid]
        if bad:
            raise KeyError(f"column {bad[0]!r} not in the {table} table; columns: {', '.join(valid)}")
        return list(columns)


class EpochView(Mapping):
    """The layers of one epoch: ``t["E_3"]["L_hidden_1"]``."""

    def __init__(self, trace: Trace, epoch: int) -> None:
        self.trace, self.epoch = trace, epoch

    def __getitem__(self, layer: str) -> LayerView:
        return LayerView(self.trace, self.epoch, self.trace._check_layer(layer))

    def __iter__(self) -> Iterator[str]:
        return iter(self.trace.layers)

    def __len__(self) -> int:
        return len(self.trace.layers)

    def to_dataframe(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        return self.trace.query(f"E_{self.epoch}", columns=columns)

    def __repr__(self) -> str:
        return f"EpochView(E_{self.epoch}, layers={self.trace.layers})"


class LayerView(Mapping):
    """The neurons of one layer at one epoch: ``t["E_3"]["L_hidden_1"]["n_20"]`` is a metric dict."""

    def __init__(self, trace: Trace, epoch: int, layer: str) -> None:
        self.trace, self.epoch, self.layer = trace, epoch, layer
        self.size = trace._layers[layer]["neurons"]

    def __getitem__(self, neuron: str | int) -> dict[str, Any]:
        index = neuron if isinstance(neuron, int) else parse_key("n_", neuron)
        if not 0 <= index < self.size:
            raise KeyError(f"neuron {neuron!r} not in layer {self.layer!r}; neurons: n_0 … n_{self.size - 1}")
        columns = self.trace._columns("neurons", None) + ["weights"]
        frame = self.trace.query(f"E_{self.epoch}/{self.layer}/n_{index}", columns=columns)
        if frame.empty:
            history = self.trace.query(f"E_*/{self.layer}/n_{index}", columns=["act_count"])
            present = sorted(set(history.index.get_level_values("epoch")))
            raise KeyError(
                f"layer {self.layer!r} has no rows at epoch {self.epoch}; epochs with it: {_short(present)}"
            )
        row = _plain(frame.iloc[0].to_dict())
        if self.trace.num_classes:
            classes = self.trace.query(f"E_{self.epoch}/{self.layer}/n_{index}", table="classes")
            row["class_mean"] = {
                int(c): float(v) for c, v in zip(classes.index.get_level_values("class"), classes["act_mean"])
            }
        return row

    def __iter__(self) -> Iterator[str]:
        return (neuron_key(i) for i in range(self.size))

    def __len__(self) -> int:
        return self.size

    def to_dataframe(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        return self.trace.query(f"E_{self.epoch}/{self.layer}", columns=columns)

    def __repr__(self) -> str:
        return f"LayerView(E_{self.epoch}/{self.layer}, neurons={self.size})"


def _stat(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime, size) of ``path``, or None when it is gone: cheap to compare before each read."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def _to_frame(data: pa.Table, table: str, columns: list[str]) -> pd.DataFrame:
    index = ["epoch"] + INDEX_COLUMNS[table]
    frame = data.to_pandas(types_mapper=None, ignore_metadata=True)
    if "layer" in frame:
        frame["layer"] = frame["layer"].astype(str)
    frame = frame.set_index(index)
    return frame[columns]


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """numpy scalars to Python numbers; a weights array stays an array."""
    out = {}
    for k, v in row.items():
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def _short(values: list[int]) -> str:
    if len(values) <= 12:
        return str(values)
    return f"[{', '.join(map(str, values[:5]))}, …, {', '.join(map(str, values[-3:]))}] ({len(values)})"
