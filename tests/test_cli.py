"""Tests for nn_staining.cli: ``query`` and ``info`` in-process, errors as exit code 2, and one run of
``main.py`` end to end."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import EPOCHS, HIDDEN, MLP_LAYERS, N_CLASSES, Run, assert_close

from nn_staining import cli, load_trace
from nn_staining.signature import GRAMMAR

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_query_prints_the_history_of_a_neuron(mlp_run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "query", str(mlp_run.store), "E_*/L_hidden_1/n_20")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert "act_mean" in lines[0] and "act_std" in lines[0]
    assert [line.split()[:3] for line in lines if "L_hidden_1" in line][0] == ["0", "L_hidden_1", "20"]
    body = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in body] == [str(e) for e in range(EPOCHS)]
    expected = load_trace(mlp_run.store).query("E_*/L_hidden_1/n_20")
    assert f"{expected['act_count'].iloc[0]}" in out


def test_query_csv_equals_trace_query(mlp_run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys, "query", str(mlp_run.store), "E_1:3/L_output", "--csv", "--columns", "act_mean,bias"
    )
    assert code == 0
    frame = pd.read_csv(io.StringIO(out), index_col=["epoch", "layer", "neuron"])
    expected = load_trace(mlp_run.store).query("E_1:3/L_output", columns=["act_mean", "bias"])
    assert frame.index.tolist() == expected.index.tolist()
    assert list(frame.columns) == ["act_mean", "bias"]
    assert_close(frame.to_numpy(), expected.to_numpy(), rtol=1e-6)


def test_query_other_tables(mlp_run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys, "query", str(mlp_run.store), "E_0/L_output/n_1", "--table", "classes", "--csv"
    )
    assert code == 0
    frame = pd.read_csv(io.StringIO(out))
    assert frame["class"].tolist() == list(range(N_CLASSES))
    assert frame["act_count"].sum() == load_trace(mlp_run.store)["E_0/L_output/n_1"]["act_count"]


def test_info_lists_layers_neurons_epochs_classes_and_size(
    mlp_run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "info", str(mlp_run.store))
    assert code == 0, err
    lines = out.splitlines()
    neurons = {
        "L_input": HIDDEN,
        "L_relu_1": HIDDEN,
        "L_hidden_1": HIDDEN,
        "L_relu_2": HIDDEN,
        "L_output": N_CLASSES,
    }
    for layer in MLP_LAYERS:
        row = next(line.split() for line in lines if line.split() and line.split()[0] == layer)
        assert str(neurons[layer]) in row, layer
    assert any("Linear" in line and "L_hidden_1" in line for line in lines)
    epochs_line = next(line for line in lines if "recorded epochs" in line)
    assert "0-3" in epochs_line or "0, 1, 2, 3" in epochs_line
    classes_line = next(line for line in lines if line.startswith("classes"))
    assert f"({N_CLASSES})" in classes_line and "0, 1, 2" in classes_line
    size_line = next(line for line in lines if "size" in line)
    assert any(unit in size_line for unit in ("KiB", "MiB", " B"))
    assert str(sum(neurons.values())) in out


@pytest.mark.parametrize("signature", ["E_x/L_hidden_1", "E_1/hidden_1/n_2", "E_1/L_hidden_1/n_"])
def test_bad_signature_exits_2_with_a_message(
    mlp_run: Run, capsys: pytest.CaptureFixture[str], signature: str
) -> None:
    code, out, err = run_cli(capsys, "query", str(mlp_run.store), signature)
    assert code == 2
    assert repr(signature) in err and GRAMMAR in err
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["E_1/L_hiden_1"], "L_hidden_1"),
        (["E_8/L_hidden_1"], "[0, 1, 2, 3]"),
        (["E_1/L_hidden_1", "--columns", "act_maen"], "act_mean"),
    ],
)
def test_query_names_nothing_recorded_exits_2(
    mlp_run: Run, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = run_cli(capsys, "query", str(mlp_run.store), *argv)
    assert code == 2
    assert err.startswith("error:") and message in err


@pytest.mark.parametrize("command", ["info", "query"])
def test_not_a_trace_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    extra = ["E_0"] if command == "query" else []
    code, _, err = run_cli(capsys, command, str(tmp_path), *extra)
    assert code == 2 and "not an nn_staining trace" in err
    code, _, err = run_cli(capsys, command, str(tmp_path / "missing"), *extra)
    assert code == 2 and "does not exist" in err


def test_main_py_trains_records_and_reports(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "main.py",
            "--epochs",
            "2",
            "--output-dir",
            str(tmp_path),
            "--no-figures",
            "--no-report",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    store = tmp_path / "breast_cancer"
    t = load_trace(store)
    assert t.epochs == [0, 1]
    assert t.layers == ["L_input", "L_hidden_1", "L_output"]
    assert t.class_names == ["malignant", "benign"]
    assert str(store) in result.stdout
    assert (t.to_dataframe()["act_count"] == 426).all(), "75% of the 569 breast-cancer samples"
    assert not (store / "figures").exists() and not (store / "report.html").exists()
    # by default: checkpoints, the interventions and a probe set of the first 256 held-out samples
    assert (store / "checkpoints").is_dir() and (store / "interventions").is_dir()
    assert t.probe(1, "L_hidden_1").shape[0] == 143  # 25% of 569 held out: all of them, under 256


def test_main_py_flags_turn_off_the_probe_checkpoints_and_interventions(tmp_path: Path) -> None:
    """The defaults are checked by the test above."""
    args = [
        "--epochs",
        "2",
        "--output-dir",
        str(tmp_path),
        "--no-figures",
        "--no-report",
        "--run-name",
        "off",
    ]
    result = subprocess.run(
        [sys.executable, "main.py", *args, "--probe", "0", "--no-checkpoints", "--no-interventions"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    off = tmp_path / "off"
    assert load_trace(off).epochs == [0, 1]
    assert not (off / "checkpoints").exists() and not (off / "interventions").exists()
    assert not (off / "probes").exists()


def test_main_py_draws_figures_and_writes_the_report_and_says_so(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "main.py", "--dataset", "moons", "--epochs", "2", "--hidden", "4", "--output-dir",
         str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "drawing figures…" in result.stderr  # the progress bar (tqdm writes to stderr)
    figures = sorted(p.name for p in (tmp_path / "moons" / "figures").iterdir())
    assert "staining_graph_animation.gif" in figures and "staining_graph.png" in figures
    assert f"figures: {tmp_path / 'moons' / 'figures'}/ ({len(figures) - 1} PNG, 1 GIF)" in result.stdout
    report = tmp_path / "moons" / "report.html"  # written by default
    assert "writing report…" in result.stdout and f"report: {report}" in result.stdout
    assert report.stat().st_size < 10_000_000


def test_make_venv_registers_the_kernel_the_notebook_selects() -> None:
    """`make venv` installs the `nn_staining` kernel into the venv (ipykernel --sys-prefix), and
    analysis.ipynb's metadata selects it, so JupyterLab opens the notebook on this environment."""
    import json

    from jupyter_client.kernelspec import KernelSpecManager

    assert "ipykernel install --sys-prefix --name nn_staining" in (ROOT / "Makefile").read_text()
    spec = KernelSpecManager().get_kernel_spec("nn_staining")
    assert Path(spec.resource_dir).resolve().is_relative_to(Path(sys.prefix).resolve())
    assert Path(spec.argv[0]).resolve() == Path(sys.executable).resolve()
    metadata = json.loads((ROOT / "analysis.ipynb").read_text())["metadata"]
    assert metadata["kernelspec"]["name"] == "nn_staining"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--probe", "-1", "'-1' is not a count (an integer >= 0)"),
        ("--probe", "many", "'many' is not a count (an integer >= 0)"),
        ("--epochs", "0", "'0' is not a positive integer"),
        ("--batch-size", "2.5", "'2.5' is not a positive integer"),
    ],
)
def test_bad_counts_are_refused_by_the_parser(capsys, flag: str, value: str, message: str) -> None:
    from nn_staining.cli import run_parser

    with pytest.raises(SystemExit) as exit_info:
        run_parser().parse_args([flag, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert run_parser().parse_args(["--probe", "0"]).probe == 0
