# The two Quickstart commands: `make demo` (set up, draw a picture) and `make test` (set up, run the tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= a red circle to the left of a blue square
OUT ?= mars-demo.png

.PHONY: setup setup-dev demo test test-slow

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is installed first and pinned exactly: the CPU wheel on local disk (any other spec pulls CUDA).
setup: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .

setup-dev: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,serve]'

demo: setup
	$(BIN)/mars generate "$(PROMPT)" -o $(OUT) --overwrite --jacobi-window 3  # re-running redraws it

test: setup-dev
	$(BIN)/python -m pytest -q

test-slow: setup-dev
	$(BIN)/python -m pytest -q -m slow
