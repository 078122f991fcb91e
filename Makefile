# enserve: the two commands of the README's quickstart.
#   make serve   install enserve, build the default digits ensemble on the first run (about 4 min),
#                and serve it on 8000/8001/8002
#   make test    install everything the tests need and run the whole suite
PYTHON ?= python3
VENV ?= .venv
REPO ?= model_repository
BIN := $(VENV)/bin

.PHONY: serve test lint bench install-serve install-tune install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { apt-get update && apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip

install-serve: $(BIN)/python
	$(BIN)/pip install -q -e .

install-tune: $(BIN)/python
	$(BIN)/pip install -q -e ".[tune]"

install-dev: $(BIN)/python
	$(BIN)/pip install -q -e ".[dev,loadtest,tune]"

$(REPO)/ensemble/config.pbtxt: | install-tune
	$(BIN)/enserve build --dataset digits --time-budget 3m --workers 2 --library library --model-repository $(REPO)

serve: install-tune $(REPO)/ensemble/config.pbtxt
	$(BIN)/enserve serve --model-repository $(REPO) $(ARGS)

test: install-dev
	$(BIN)/ruff check .
	PYTHONPATH=src $(BIN)/lint-imports
	$(BIN)/python -m pytest -q $(ARGS)

bench: install-serve $(REPO)/ensemble/config.pbtxt
	$(BIN)/enserve bench --model-repository $(REPO) $(ARGS)

clean:
	rm -rf $(VENV) $(REPO) library build *.egg-info src/*.egg-info
