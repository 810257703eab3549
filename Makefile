PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-speed docs

$(STAMP): pyproject.toml scripts/setup_venv.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup_venv.sh

demo: $(STAMP)
	$(VENV)/bin/flatmin bench --preset demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# The documentation site (docs/, Sphinx): offline, every warning an error (-W), every
# unresolved cross-reference a warning (-n), all of them listed (--keep-going), a fresh
# environment (-E: an incremental build would not repeat unchanged pages' warnings).
docs: $(STAMP)
	rm -rf build/docs
	$(VENV)/bin/python -m sphinx -E -W -n --keep-going -q -b html docs build/docs
	@echo "built build/docs/index.html"
