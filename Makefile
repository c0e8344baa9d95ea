# `make run` and `make test` set everything up from nothing: a .venv filled from requirements.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
#: the run that `make notebook` and `make report` read (the notebook records it first when it is missing)
RUN ?= results/breast_cancer

.PHONY: venv run test lint format bench bench-store notebook lab report clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name nn_staining --display-name "Python (nn_staining)" >/dev/null
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)  ## train the demo model, record it and draw its figures (ARGS="--dataset digits" …)
	$(BIN)/python main.py $(ARGS)

test: $(STAMP) lint  ## lint, then the whole test suite
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

$(VENV)/.bench: $(STAMP) requirements-bench.txt
	$(BIN)/python -m pip install --quiet -r requirements-bench.txt
	touch $@

bench: $(VENV)/.bench  ## recording overhead against plain training and TensorBoard
	$(BIN)/python benchmarks/overhead.py $(ARGS)

bench-store: $(STAMP)  ## store write throughput and query latency at 100M rows (QUICK=1 for a small run)
	$(BIN)/python benchmarks/store.py $(if $(QUICK),--quick,) $(ARGS)

clean:
	rm -rf $(VENV) results/*/ .pytest_cache .ruff_cache

notebook: $(STAMP)  ## run analysis.ipynb headless; the executed copy goes to $(RUN)/analysis.ipynb and .html
	NN_STAINING_RUN=$(RUN) $(BIN)/jupyter nbconvert --log-level WARN --to notebook --execute analysis.ipynb \
		--ExecutePreprocessor.timeout=600 --output-dir $(RUN) --output analysis
	$(BIN)/jupyter nbconvert --log-level WARN --to html $(RUN)/analysis.ipynb --output-dir $(RUN)
	@echo "executed notebook: $(RUN)/analysis.ipynb and $(RUN)/analysis.html"

lab: $(STAMP)  ## open analysis.ipynb in JupyterLab with the venv's nn_staining kernel
	$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root,) analysis.ipynb

report: $(STAMP)  ## write $(RUN)/report.html, the interactive report (main.py writes it too)
	$(BIN)/python -m nn_staining report $(RUN)
