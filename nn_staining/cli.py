"""The command line: ``python -m nn_staining {run,query,info,report}`` (``main.py`` is ``run``)."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence

import pandas as pd

from .signature import GRAMMAR

EXAMPLE_SIGNATURE = "E_*/L_hidden_1/n_0"


def _epoch_intervals(text: str) -> int | list[int] | None:
    """``--epoch-intervals``: 'all', an int k (every k-th epoch, -1 the last) or a list '0,5,9'."""
    if text in ("all", "none", "None"):
        return None
    problem = (
        f"{text!r} is not 'all', a positive int k (every k-th epoch), -1 (the last) or a list like 0,5,9"
    )
    try:
        value: int | list[int] = (
            [int(part) for part in text.split(",") if part.strip()] if "," in text else int(text)
        )
    except ValueError:
        raise argparse.ArgumentTypeError(problem) from None
    bad = (value == 0 or value < -1) if isinstance(value, int) else (not value or min(value) < 0)
    if bad:
        raise argparse.ArgumentTypeError(problem)
    return value


def _at_least(text: str, low: int, what: str) -> int:
    """``text`` as an int >= ``low``, or an argparse error naming ``what`` it must be."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _count(text: str) -> int:
    """An int >= 0 (a sample count, 0 for none)."""
    return _at_least(text, 0, "a count (an integer >= 0)")


def _positive(text: str) -> int:
    """An int > 0 (epochs, widths, batch sizes)."""
    return _at_least(text, 1, "a positive integer")


def _run_name(text: str) -> str:
    """``--run-name``: a plain folder name (no path, not empty, not . or ..)."""
    from .pipeline import check_run_name

    try:
        return check_run_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("run_name ")) from None


def run_parser(prog: str = "main.py") -> argparse.ArgumentParser:
    """The settings of the default pipeline."""
    from .data import DATASETS

    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a demo model on a bundled data set while nn_staining records it, "
        "then write the trace and its figures to <output-dir>/<run-name>/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", choices=DATASETS, default="breast_cancer", help="bundled data set")
    p.add_argument(
        "--model", choices=["simple", "cnn"], default="simple", help="demo model (cnn needs digits)"
    )
    p.add_argument("--epochs", type=_positive, default=30, help="training epochs")
    p.add_argument("--hidden", type=_positive, default=64, help="hidden layer width of SimpleNN")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--batch-size", type=_positive, default=32, help="training batch size")
    p.add_argument("--seed", type=int, default=0, help="random seed (data split, init, shuffling)")
    p.add_argument(
        "--epoch-intervals",
        type=_epoch_intervals,
        default=None,
        help="which epochs to record: 'all', k (every k-th and the last), -1 (the last) or a list 0,5,9",
    )
    p.add_argument(
        "--keep-batches", action="store_true", help="also keep per-batch statistics (drop_batches=False)"
    )
    p.add_argument("--record-eval", action="store_true", help="also record the held-out evaluation passes")
    p.add_argument("--output-dir", default="results", help="where runs are written")
    p.add_argument(
        "--run-name",
        type=_run_name,
        default=None,
        help="run folder name, a plain name (default: the data set's name); replaced if it exists",
    )
    p.add_argument(
        "--probe",
        type=_count,
        default=256,
        help="held-out samples run as the probe set at each recorded epoch (0: no probe set)",
    )
    p.add_argument(
        "--no-checkpoints", action="store_true", help="do not save the model's weights at each recorded epoch"
    )
    p.add_argument(
        "--no-interventions", action="store_true", help="skip the ablation check of the stains after training"
    )
    p.add_argument("--no-figures", action="store_true", help="skip drawing the figures")
    p.add_argument("--no-report", action="store_true", help="skip writing the interactive report.html")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return p


def run_command(args: argparse.Namespace) -> int:
    """Train, record, store and report; prints where the trace is and one example query."""
    from tqdm.auto import tqdm

    from .pipeline import RunConfig, run_pipeline
    from .trace import load_trace

    config = RunConfig(
        dataset=args.dataset,
        model=args.model,
        epochs=args.epochs,
        hidden=args.hidden,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        epoch_intervals=args.epoch_intervals,
        keep_batches=args.keep_batches,
        record_eval=args.record_eval,
        output_dir=args.output_dir,
        run_name=args.run_name,
        figures=not args.no_figures,
        probe=args.probe,
        checkpoints=not args.no_checkpoints,
        interventions=not args.no_interventions,
    )
    if isinstance(config.epoch_intervals, list) and max(config.epoch_intervals) >= config.epochs:
        late = [e for e in config.epoch_intervals if e >= config.epochs]
        if len(late) == len(config.epoch_intervals):
            raise ValueError(
                f"--epoch-intervals {','.join(map(str, late))} names no epoch below --epochs {config.epochs}"
            )
        print(
            f"warning: --epoch-intervals lists epochs {late} but --epochs is {config.epochs}", file=sys.stderr
        )
    bar = tqdm(total=config.epochs, desc=f"training {config.model} on {config.dataset}", unit="epoch")

    def on_epoch(r) -> None:
        bar.set_postfix(loss=f"{r.loss:.4f}", acc=f"{r.train_acc:.3f}", test_acc=f"{r.test_acc:.3f}")
        bar.update(1)

    try:
        result = run_pipeline(config, on_epoch)
    finally:
        bar.close()
    last = result.history[-1]
    trace = load_trace(result.store)
    print(
        f"\nfinal epoch {last.epoch}: train loss {last.loss:.4f}, train acc {last.train_acc:.3f}, "
        f"held-out acc {last.test_acc:.3f}"
    )
    print(
        f"trace: {result.store}/ ({len(trace.epochs)} epochs, {', '.join(trace.layers)}; "
        f"{trace.size_bytes() / 1024:.0f} KiB)"
    )
    if config.figures:
        from .figures import figure_names, save_figures

        names = figure_names(trace)
        with tqdm(total=len(names), desc="drawing figures…", unit="figure", leave=False) as figure_bar:

            def on_figure(name: str) -> None:
                figure_bar.set_postfix_str(name)
                figure_bar.update(1)

            paths = save_figures(trace, result.store / "figures", progress=on_figure)
        kinds = ", ".join(f"{sum(p.suffix == s for p in paths)} {s[1:].upper()}" for s in (".png", ".gif"))
        print(f"figures: {result.store / 'figures'}/ ({kinds})")
    if not args.no_report:
        from .report import write_report

        print("writing report…", end="", flush=True)
        report = write_report(trace)
        print(
            f"\rreport: {report} ({report.stat().st_size / 1e6:.1f} MB; open it in a browser, no server needed)"
        )
    layer = "L_hidden_1" if "L_hidden_1" in trace.layers else trace.layers[min(1, len(trace.layers) - 1)]
    neuron = 20 if trace.layer_info(layer)["neurons"] > 20 else 0
    signature = f"E_*/{layer}/n_{neuron}"
    columns = ["act_mean", "act_std", "act_active_frac", "bias", "weight_norm"]
    history = trace.query(signature, columns=columns)
    command = shlex.join(["python", "-m", "nn_staining", "query", str(result.store), signature])
    print(f"\nexample query: trace.query({signature!r})  ({command})")
    print(f"the last {min(5, len(history))} of {len(history)} rows, one per recorded epoch:")
    print(history.tail(5).to_string())
    return 0


def query_command(args: argparse.Namespace) -> int:
    """Print the rows a signature selects."""
    from .trace import load_trace

    trace = load_trace(args.store, phase=args.phase)
    columns = args.columns.split(",") if args.columns else None
    frame = trace.query(args.signature, columns=columns, table=args.table)
    if args.csv:
        frame.to_csv(sys.stdout)
        return 0
    with pd.option_context(
        "display.max_rows", args.max_rows, "display.max_columns", None, "display.width", 200
    ):
        print(frame)
    return 0


def info_command(args: argparse.Namespace) -> int:
    """Print the model's layers, neuron counts, recorded epochs, classes and the store's size."""
    from .trace import load_trace

    trace = load_trace(args.store)
    meta = trace.meta
    print(f"trace: {trace.path}  (format {meta['format_version']}, model {meta['model']['class']})")
    rows = [
        {
            "layer": info["key"],
            "type": info["type"],
            "neurons": info["neurons"],
            "kind": info["kind"],
            "parameters": " ".join(f"{k}{tuple(v)}" for k, v in info["params"].items()) or "-",
        }
        for info in meta["layers"]
    ]
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"neurons in all: {meta['num_neurons']}")
    for phase in ("train", "eval"):
        epochs = trace.epochs if phase == trace.phase else load_trace(trace.path, phase=phase).epochs
        if epochs:
            print(f"recorded epochs ({phase}): {_ranges(epochs)}  ({len(epochs)})")
    if meta.get("num_classes"):
        print(f"classes ({meta['num_classes']}): {', '.join(trace.class_names)}")
    tables = [t for t in ("neurons", "classes", "inputs", "batches") if (trace.path / t).exists()]
    print(f"tables: {', '.join(tables)}")
    print(f"size on disk: {_human(trace.size_bytes())}")
    return 0


def report_command(args: argparse.Namespace) -> int:
    """Write a run's interactive report (``<run>/report.html``) and print where it is."""
    from .report import write_report

    path = write_report(args.store, args.output, top_k=args.top_k, max_nodes=args.max_nodes)
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB; open it in a browser, no server needed)")
    return 0


def _ranges(values: list[int]) -> str:
    out, start, prev = [], None, None
    for v in values + [None]:
        if start is not None and (v is None or v != prev + 1):
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if v is not None and start is None:
            start = v
        prev = v
    return ", ".join(out)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def build_parser() -> argparse.ArgumentParser:
    """``python -m nn_staining {run,query,info,report}``."""
    parser = argparse.ArgumentParser(
        prog="python -m nn_staining", description="Record and query network traces."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="train a demo model while recording it (as main.py)",
        add_help=False,
        parents=[run_parser("python -m nn_staining run")],
    )
    run.set_defaults(func=run_command)
    query = sub.add_parser(
        "query",
        help="print the rows a signature selects",
        description=f"Print the rows a signature selects. Signature grammar: {GRAMMAR}",
    )
    query.add_argument("store", help="a trace folder, e.g. results/breast_cancer")
    query.add_argument("signature", help=f"e.g. {EXAMPLE_SIGNATURE!r}")
    query.add_argument("--columns", help="comma-separated metrics (default: all but weights)")
    query.add_argument("--table", default="neurons", choices=["neurons", "classes", "inputs", "batches"])
    query.add_argument("--phase", default="train", choices=["train", "eval"])
    query.add_argument("--csv", action="store_true", help="write CSV instead of a table")
    query.add_argument("--max-rows", type=int, default=60, help="rows shown before eliding")
    query.set_defaults(func=query_command)
    info = sub.add_parser("info", help="describe a trace: layers, neurons, epochs, classes, size")
    info.add_argument("store", help="a trace folder, e.g. results/breast_cancer")
    info.set_defaults(func=info_command)
    report = sub.add_parser(
        "report",
        help="write the run's interactive report.html (one self-contained file)",
        description="Write <run>/report.html: summary, training curves, the staining graph with an epoch "
        "slider and neuron histories, brain scans (and representation and intervention views when the run "
        "has them). One file that opens offline in a browser.",
    )
    report.add_argument("store", help="a trace folder, e.g. results/breast_cancer")
    report.add_argument("--output", help="where to write it (default: <store>/report.html)")
    report.add_argument("--top-k", type=_positive, default=None, help="pathways per output neuron")
    report.add_argument("--max-nodes", type=_positive, default=96, help="neurons drawn per layer at most")
    report.set_defaults(func=report_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m nn_staining`` and the ``nn-staining`` console script."""
    return _dispatch(build_parser().parse_args(argv))


def run_main(argv: Sequence[str] | None = None) -> int:
    """``main.py``: the run command's settings at top level."""
    args = run_parser("main.py").parse_args(sys.argv[1:] if argv is None else argv)
    args.func = run_command
    return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    """Run a parsed command: library errors become one line and exit code 2."""
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (KeyError, ValueError, FileNotFoundError, FileExistsError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
