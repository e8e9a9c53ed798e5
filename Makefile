# The front door: `make run` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
GEN    := src/spendgate/_gen
PROTOS := $(wildcard protos/spendgate/v1/*.proto)

.PHONY: run test lint proto proto-check buf-lint bench clean help

help:
	@echo "make run         start the server on the embedded default with the example fleet"
	@echo "make test        run the whole test suite (real Redis and PostgreSQL where present)"
	@echo "make lint        ruff, mypy --strict and buf lint"
	@echo "make proto       regenerate the committed gRPC code from protos/"
	@echo "make proto-check fail if the committed generated code differs from a regeneration"
	@echo "make bench       run the benchmarks and print their figures"

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/spendgate serve --plan examples/fleet.yaml --log-format text --metrics-port 9464

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP) buf-lint
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

node_modules/.bin/buf: package.json
	npm install --silent --no-audit --no-fund
	touch $@

buf-lint: node_modules/.bin/buf
	node_modules/.bin/buf lint

proto: $(STAMP)
	$(BIN)/python tools/gen_proto.py $(GEN)

proto-check: $(STAMP)
	rm -rf .proto-check && $(BIN)/python tools/gen_proto.py .proto-check
	diff -r --exclude=__pycache__ $(GEN) .proto-check || (echo "generated code is stale: run make proto" && exit 1)
	rm -rf .proto-check

bench: $(STAMP)
	$(BIN)/python -m spendgate.bench

clean:
	rm -rf $(VENV) .proto-check .pytest_cache .mypy_cache .ruff_cache node_modules
