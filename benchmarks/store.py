"""Store at scale: write throughput, query latency and peak RSS of a trace of 100M neuron rows,
and the history of one neuron over 10,000 recorded epochs.

    python benchmarks/store.py                 # 500 epochs x 200,000 neurons = 100M rows (~2 GB),
                                               # then 10,000 epochs x 10,000 neurons (100M rows)
    python benchmarks/store.py --quick         # 50 epochs x 200,000 neurons (10M rows), then
                                               # 10,000 epochs x 100 neurons written without a model
    python benchmarks/store.py --case history  # only the 10,000-epoch case
    python benchmarks/store.py --case width    # memory at width: Linear(16, 1,000,000), 10 classes

The traces are recorded through the public API (NetworkTrace on Linear(8, width) then ReLU, one
batch per epoch, weights not kept). Each query then runs in a fresh Python process; its time is
measured from ``load_trace`` (imports excluded), with the process's peak RSS. The history case
times the query with the history index and with it ignored (the trace reading one part per epoch,
as before the index existed), alternating, in fresh processes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

QUERY_SCRIPT = """
import json, sys, time
sys.path.insert(0, {root!r})
from nn_staining import load_trace
start = time.perf_counter()
t = load_trace({store!r})
frame = {expression}
elapsed = time.perf_counter() - start
# VmHWM: this process's own peak RSS (ru_maxrss would include the parent's, inherited at fork)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({{"seconds": elapsed, "rows": len(frame), "peak_rss_mib": int(hwm.split()[1]) / 1024}}))
"""


def record(
    store: str, epochs: int, width: int, keep_weights: bool, every: int = 50
) -> tuple[float, float, list[float]]:
    """Record ``epochs`` epochs of a 2×``width``-neuron model.

    Returns (seconds, seconds inside end_epoch, RSS in MiB after every 50th epoch).
    """
    import psutil
    import torch
    from torch import nn

    from nn_staining import NetworkTrace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width), nn.ReLU())
    x = torch.randn(16, 8)
    spent_in_end = 0.0
    rss: list[float] = []
    process = psutil.Process()
    start = time.perf_counter()
    with NetworkTrace(model, store, record_weights=keep_weights, overwrite=True) as trace:
        for epoch in range(epochs):
            trace.start_epoch(epoch)
            with torch.no_grad():
                model(x + 0.01 * epoch)
            t0 = time.perf_counter()
            trace.end_epoch()
            spent_in_end += time.perf_counter() - t0
            if epoch % every == 0 or epoch == epochs - 1:
                rss.append(process.memory_info().rss / 2**20)
                print(f"  epoch {epoch}/{epochs}  RSS {rss[-1]:.0f} MiB", flush=True)
    return time.perf_counter() - start, spent_in_end, rss


#: Averaging ``act_mean`` per layer per epoch: through DuckDB (``Trace.sql``) and through pandas.
AGGREGATES = {
    "per-layer per-epoch mean, t.sql": (
        't.sql("SELECT epoch, layer, avg(act_mean) AS m FROM neurons GROUP BY ALL")'
    ),
    "per-layer per-epoch mean, pandas": (
        't.to_dataframe(columns=["act_mean"]).groupby(["epoch", "layer"])["act_mean"].mean()'
    ),
}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def write_direct(store: str, epochs: int, neurons: int) -> float:
    """Write ``epochs`` epochs of two ``neurons // 2``-neuron layers as the epoch writer does (part,
    commit, history index), without a model or recorder; returns the seconds taken."""
    import numpy as np

    from nn_staining.catalog import FORMAT_NAME, FORMAT_VERSION, Commit, new_run_id
    from nn_staining.store import TraceWriter, build_table

    half = neurons // 2
    layers = [{"key": f"L_{i}", "neurons": half, "kind": "features", "row_offset": i * half} for i in (0, 1)]
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "run_id": new_run_id(),
        "layers": layers,
        "layouts": [{"neurons": ["L_0", "L_1"], "inputs": []}],
    }
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    writer = TraceWriter(store, overwrite=True)
    writer.write_meta(meta)
    for epoch in range(epochs):
        columns = {
            "layer": np.repeat(np.arange(2, dtype=np.int32), half),
            "phase": "train",
            "neuron": np.tile(np.arange(half, dtype=np.int32), 2),
            "act_count": np.full(neurons, 16),
        }
        for name in ("act_mean", "act_std", "act_min", "act_max", "act_active_frac"):
            columns[name] = rng.random(neurons, dtype=np.float32)
        table = build_table("neurons", columns, ["L_0", "L_1"])
        commit = Commit(epoch, "train", 0, writer.write_epoch(epoch, "train", {"neurons": table}))
        writer.commit(commit)
        writer.index_committed(commit, table)
    return time.perf_counter() - start


def history_case(
    base: str, epochs: int, neurons: int, repeats: int, direct: bool = False, existing: str | None = None
) -> None:
    """Record ``epochs`` epochs of a ``neurons``-neuron model and time one neuron's history from
    ``load_trace`` in fresh processes, with the history index (``repeats`` times) and with it
    ignored (``repeats`` times; once when ``direct``, the --quick run, writes without a model)."""
    store = os.path.join(base, f"history-{epochs}x{neurons}")
    rows = epochs * neurons
    how = "through the store's writer (no model)" if direct else "through NetworkTrace"
    print(
        f"\nrecording {epochs:,} epochs x {neurons:,} neurons = {rows:,} neuron rows {how} into {store}",
        flush=True,
    )
    if existing:
        store = existing
        print(f"(not recorded: timing the queries of the existing store {store})", flush=True)
        seconds = in_end = float("nan")
    elif direct:
        seconds = in_end = write_direct(store, epochs, neurons)
    else:
        seconds, in_end, _ = record(
            store, epochs, neurons // 2, keep_weights=False, every=max(1, epochs // 5)
        )
    index = os.path.join(store, "_history", "neurons")
    blocks = len(os.listdir(index)) if os.path.isdir(index) else 0
    print(
        f"write: {seconds:.1f} s in all ({seconds / epochs * 1e3:.2f} ms per epoch, end_epoch itself "
        f"{in_end / epochs * 1e3:.2f} ms), {rows / seconds / 1e6:.2f} M rows/s; "
        f"{table_bytes(store, 'neurons') / 2**20:.0f} MiB of parts in {epochs:,} files, "
        f"{table_bytes(store, '_history') / 2**20:.0f} MiB of history index in {blocks} blocks",
        flush=True,
    )
    signature = f"E_*/L_0/n_{min(5, neurons // 2 - 1)}"
    variants = {
        "with the history index": f"t.query({signature!r})",
        "index ignored (one part per epoch)": f"(t._blocks.clear(), t.query({signature!r}))[1]",
    }
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(repeats):
        for name, expression in variants.items():
            if not direct or repeat == 0 or name == "with the history index":
                results[name].append(query(store, expression=expression))
    print(
        f"\n| history `{signature}`, {epochs:,} epochs x {neurons:,} neurons | rows | median s | runs s | peak RSS MiB |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        secs = [r["seconds"] for r in runs]
        print(
            f"| {name} | {runs[0]['rows']:,} | {median(secs):.3f} | {', '.join(f'{x:.2f}' for x in secs)} | "
            f"{max(r['peak_rss_mib'] for r in runs):.0f} |",
            flush=True,
        )
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)


def query(store: str, signature: str | None = None, expression: str | None = None) -> dict:
    """Run one query (a signature, or a Python expression of ``t``) in a fresh process; returns
    its seconds, rows and peak RSS."""
    expression = expression or f"t.query({signature!r})"
    script = QUERY_SCRIPT.format(root=ROOT, store=store, expression=expression)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def checksum_cost(store: str, repeats: int = 5) -> str:
    """Page checksums: read every neurons part with and without verification, and write one
    epoch's part with and without them, alternating; returns a one-line summary."""
    import glob
    import statistics

    import pyarrow.parquet as pq

    parts = sorted(glob.glob(os.path.join(store, "neurons", "*", "part-0.parquet")))
    table = pq.read_table(parts[0])
    reads: dict[bool, list[float]] = {True: [], False: []}
    writes: dict[bool, list[float]] = {True: [], False: []}
    target = os.path.join(store, ".checksum-bench.parquet")
    for _ in range(repeats):
        for verify in (True, False):
            start = time.perf_counter()
            for path in parts:
                pq.ParquetFile(path, page_checksum_verification=verify).read(columns=["act_mean", "act_std"])
            reads[verify].append(time.perf_counter() - start)
            start = time.perf_counter()
            pq.write_table(table, target, row_group_size=8192, write_page_checksum=verify)
            writes[verify].append(time.perf_counter() - start)
    os.remove(target)
    med = {k: statistics.median(v) for k, v in reads.items()}
    wmed = {k: statistics.median(v) for k, v in writes.items()}
    return (
        f"page checksums: reading 2 columns of {len(parts)} parts {med[True]:.3f} s verified vs "
        f"{med[False]:.3f} s not ({med[True] / med[False]:.2f}x); writing one epoch's part "
        f"{wmed[True] * 1e3:.1f} ms with vs {wmed[False] * 1e3:.1f} ms without ({wmed[True] / wmed[False]:.2f}x)"
    )


def table_bytes(store: str, table: str) -> int:
    total = 0
    for folder, _, files in os.walk(os.path.join(store, table)):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="50 epochs (rows case); 100 neurons written without a model (history)",
    )
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--width", type=int, default=100_000, help="neurons per layer (two layers)")
    p.add_argument("--dir", default=None, help="where to write the store (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the store afterwards")
    p.add_argument("--repeats", type=int, default=3, help="query repetitions (median reported)")
    p.add_argument(
        "--case", choices=["rows", "history", "width", "all"], default="all", help="which case to run"
    )
    p.add_argument("--wide", type=int, default=1_000_000, help="width case: the layer's neurons")
    p.add_argument(
        "--skip-aggregates",
        action="store_true",
        help="rows case: skip the whole-table aggregates and checksum costs",
    )
    p.add_argument("--history-epochs", type=int, default=10_000)
    p.add_argument(
        "--history-store", default=None, help="time the history queries of this store, recording nothing"
    )
    p.add_argument(
        "--history-neurons", type=int, default=None, help="neurons of the history case (10,000; --quick 100)"
    )
    args = p.parse_args(argv)
    base = args.dir or tempfile.mkdtemp(prefix="nn_staining_store_")
    print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    try:
        if args.case in ("rows", "all"):
            rows_case(args, base)
        if args.case in ("history", "all"):
            neurons = args.history_neurons or (100 if args.quick else 10_000)
            history_case(
                base,
                args.history_epochs,
                neurons,
                max(args.repeats, 5),
                direct=args.quick,
                existing=args.history_store,
            )
        if args.case in ("width", "all"):
            width_case(base, args.wide)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


WIDTH_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from torch import nn
model = nn.Linear(16, {width})
x, y = torch.randn({batch}, 16), torch.arange({batch}) % 10
optimiser = torch.optim.SGD(model.parameters(), lr=1e-3)  # imports torch._dynamo, as any optimiser does


def step():
    optimiser.zero_grad()
    model(x).sum().backward()
    optimiser.step()


if {recorded}:
    from nn_staining import NetworkTrace
    with NetworkTrace(model, {store!r}, num_classes=10) as t:
        for e in range({epochs}):
            t.start_epoch(e); t.set_targets(y); step(); t.end_epoch()
else:
    for _ in range({epochs}):
        step()
print([int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


#: Training steps (one per recorded epoch) of the width case.
WIDTH_EPOCHS = 3


def width_case(base: str, width: int) -> None:
    """Peak RSS of recording one wide Linear layer (10 classes, one SGD step per epoch, 3 epochs,
    background writer) against the same training unrecorded, at batch 1 and 64, each in a fresh
    process. Both runs build the optimiser, which imports torch._dynamo (about 140 MiB)."""
    print(f"\n| Linear(16, {width:,}), 10 classes | batch | plain MiB | recorded MiB | extra MiB |")
    print("| --- | --- | --- | --- | --- |")
    for batch in (1, 64):
        peaks = []
        for recorded in (False, True):
            store = os.path.join(base, f"wide-{batch}")
            code = WIDTH_SCRIPT.format(
                root=ROOT, width=width, batch=batch, recorded=recorded, store=store, epochs=WIDTH_EPOCHS
            )
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            peaks.append(int(out.stdout.split()[-1]))
            shutil.rmtree(store, ignore_errors=True)
        print(f"| peak RSS | {batch} | {peaks[0]} | {peaks[1]} | {peaks[1] - peaks[0]} |", flush=True)


def rows_case(args: argparse.Namespace, base: str) -> None:
    """The 100M-row case (10M with --quick): write throughput, queries, bytes on disk."""
    epochs = args.epochs or (50 if args.quick else 500)
    store = os.path.join(base, "trace")
    neurons = 2 * args.width
    rows = epochs * neurons
    print(f"recording {epochs} epochs x {neurons:,} neurons = {rows:,} neuron rows into {store}")
    try:
        seconds, in_end, rss = record(store, epochs, args.width, keep_weights=False)
        nbytes = table_bytes(store, "neurons")
        print(
            f"write: {seconds:.1f} s in all, {rows / seconds / 1e6:.2f} M rows/s end to end "
            f"(end_epoch itself {in_end:.1f} s); {nbytes / rows:.2f} bytes per neuron row on disk"
        )
        print(
            f"recorder RSS: {rss[0]:.0f} MiB after the first epoch, {rss[-1]:.0f} MiB after the last "
            f"(max {max(rss):.0f} MiB)"
        )
        weight_store = store + "-weights"
        w_epochs = min(epochs, 20)
        record(weight_store, w_epochs, args.width, keep_weights=True)
        w_bytes = table_bytes(weight_store, "neurons") - table_bytes(store, "neurons") * w_epochs / epochs
        weights = w_epochs * args.width * 8
        print(f"weights: {w_bytes / weights:.2f} bytes per stored weight ({w_epochs} epochs with weights)")
        shutil.rmtree(weight_store, ignore_errors=True)
        queries = {
            "history of one neuron": "E_*/L_0/n_12345",
            "one epoch-layer slice": f"E_{epochs // 2}/L_1",
            "ten epochs of one neuron": f"E_{epochs // 2}:{epochs // 2 + 10}/L_1/n_7",
        }
        print(
            "\n| query | signature | rows | median seconds | peak RSS MiB |\n| --- | --- | --- | --- | --- |"
        )
        for name, signature in queries.items():
            results = [query(store, signature) for _ in range(args.repeats)]
            secs = sorted(r["seconds"] for r in results)[len(results) // 2]
            rss = max(r["peak_rss_mib"] for r in results)
            print(f"| {name} | `{signature}` | {results[0]['rows']:,} | {secs:.3f} | {rss:.0f} |", flush=True)
        for name, expression in AGGREGATES.items() if not args.skip_aggregates else ():
            results = [query(store, expression=expression) for _ in range(args.repeats)]
            secs = sorted(r["seconds"] for r in results)[len(results) // 2]
            rss = max(r["peak_rss_mib"] for r in results)
            print(f"| {name} | all rows | {results[0]['rows']:,} | {secs:.3f} | {rss:.0f} |", flush=True)
        if not args.skip_aggregates:
            print(checksum_cost(store), flush=True)
        print(
            f"\nstore: {nbytes / 2**30:.2f} GiB neurons table, {epochs} part files; "
            f"machine: {os.cpu_count()} cores"
        )
    finally:
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
