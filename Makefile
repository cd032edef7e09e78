# The two commands of the README. Both create .venv from this repo's files when it is missing.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= demo_out

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

## make demo: the whole journey on the embedded demo pair (no downloads, no GPU): train source-only and DANN,
## export to the BentoML store, batch-score, serve on 127.0.0.1, send requests, print a table.
demo: venv
	$(BIN)/adaptserve demo --out $(OUT)

## make test: the test suite (CPU, a few minutes).
test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(OUT) .pytest_cache
