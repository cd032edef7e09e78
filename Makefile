# The two commands of the README. Both create .venv from this repo's files when it is missing.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= demo_out
MODEL  ?= adaptserve-demo:latest

.PHONY: demo test soak venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev,ray]'
	touch $@

## make demo: the whole journey on the embedded demo pair (no downloads, no GPU): train source-only and DANN,
## export to the BentoML store, batch-score, serve on 127.0.0.1, send requests, print a table.
demo: venv
	$(BIN)/adaptserve demo --out $(OUT)

## make test: the test suite (CPU; ≈ 20 min on 2 cores: the demo itself, VADA and MDAN accuracy runs, servers, Ray).
test: venv
	$(BIN)/python -m pytest -q

## make soak: 5 minutes of mixed valid and invalid requests (concurrency 64) against bentoml serve on
## 127.0.0.1 — the model of `make demo` unless MODEL=tag; results: docs/benchmarks.md §8.
soak: venv
	$(BIN)/python benchmarks/soak.py --model $(MODEL) --duration 300 --concurrency 64

clean:
	rm -rf $(OUT) .pytest_cache
