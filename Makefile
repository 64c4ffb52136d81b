# Both targets are self-sufficient: they create .venv and install the project if needed.
# constraints.txt pins the exact versions installed (pyproject.toml only declares ranges).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt

.PHONY: demo test faults lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade -c $(CONSTRAINTS) pip setuptools

# setuptools too: the wheel test builds without build isolation, with the venv's own
# setuptools (>=77 for the SPDX license string).
$(STAMP): pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) setuptools -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kernelscale run

# Three workers; tests go to whichever is free, except the Slurm tests (one group, on one
# worker: they never race each other for the cluster). Most tests wait on subprocesses,
# so a third worker shortens the suite on two cores (measured: 518 s against 548 s), and
# spreading single tests rather than whole files shortens its tail (412 s against 429 s).
TEST_WORKERS ?= 3

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# the fault-injection cases alone, with their table (also printed by `make test`)
faults: $(STAMP)
	$(BIN)/python -m pytest -q -m fault

lint: $(STAMP)
	$(BIN)/ruff check kernelscale tests

clean:
	rm -rf demo-out .pytest_cache
