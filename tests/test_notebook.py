"""analysis.ipynb: committed without outputs, and runs top to bottom in a fresh kernel on a fresh trace."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pyarrow.parquet as pq
import pytest
from nbclient import NotebookClient

from nn_staining import load_trace

NOTEBOOK = Path(__file__).resolve().parents[1] / "analysis.ipynb"
#: Epochs of the fresh run the notebook records in the test (the notebook's default is 30).
EPOCHS = 8


def _is_figure_cell(cell) -> bool:
    return cell.cell_type == "code" and ("plots.plot_" in cell.source or "Figure(" in cell.source)


def _pngs(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.outputs)


def test_committed_notebook_has_no_outputs() -> None:
    assert NOTEBOOK.stat().st_size < 100_000
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [], cell.source[:80]
        assert cell.execution_count is None, cell.source[:80]
    assert (
        nb.metadata.kernelspec.name == "nn_staining"
    )  # the kernel `make venv` registers (test_cli checks it)
    assert code[0].source.count("run_pipeline(") == 1 and "load_trace(RUN)" in code[0].source


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[nbformat.NotebookNode, Path]:
    """The notebook executed in a fresh kernel in an empty folder, so that its first cell records a new run."""
    work = tmp_path_factory.mktemp("notebook")
    run = work / "results" / "fresh"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))  # which Python ran it
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("NN_STAINING_RUN", str(run))
        mp.setenv("NN_STAINING_EPOCHS", str(EPOCHS))
        client = NotebookClient(
            nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(work)}}
        )
        client.execute()
    return nb, run


def test_notebook_records_a_fresh_run(executed) -> None:
    nb, run = executed
    assert load_trace(run).epochs == list(range(EPOCHS))
    assert not (run / "figures").exists()  # the notebook draws its figures inline only
    assert nb.cells[-1].outputs[0]["text"].strip() == sys.prefix  # the kernel is this environment's Python


def _printed(nb: nbformat.NotebookNode) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "stream"
    )


def test_notebook_prints_what_the_store_holds(executed) -> None:
    """nbclient raises on a failing cell; these check what the cells print against meta.json and
    the Parquet files, read here without nn_staining."""
    nb, run = executed
    printed = _printed(nb)
    meta = json.loads((run / "meta.json").read_text())
    assert f"classes: {meta['class_names']}" in printed
    neurons = sum(layer["neurons"] for layer in meta["layers"])
    parts = sorted((run / "neurons").glob("epoch=*/part-0.parquet"))
    assert len(parts) == EPOCHS
    columns = [c for c in pq.read_schema(parts[0]).names if c not in ("phase", "layer", "neuron", "weights")]
    assert f"shape: ({EPOCHS * neurons}, {len(columns)})" in printed
    assert f"DuckDB and t.query agree on all {EPOCHS} epochs" in printed


def test_notebook_shows_each_figure_once(executed) -> None:
    nb, _ = executed
    figures = [cell for cell in nb.cells if _is_figure_cell(cell)]
    # one figure per cell: each plots.plot_* call, and the hand-drawn history of one neuron
    calls = sum(cell.source.count("plots.plot_") + cell.source.count("Figure(") for cell in figures)
    assert len(figures) == calls >= 8
    assert [_pngs(cell) for cell in figures] == [1] * len(figures)
    assert sum(_pngs(cell) for cell in nb.cells if cell.cell_type == "code") == len(figures)
