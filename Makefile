# The two README commands: `make demo` (main job) and `make test` (test suite, what CI runs).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The five ablation sweeps at demo scale (60 steps a cell, 2 seeds, 2 trials at a time sharing the
# CPU cores) -> results/*.md|tex|csv + figures/.
demo: $(STAMP)
	$(BIN)/python -m istr ablate --preset tiny --seeds 2 --workers 2 --set train.max_steps=60 \
	  --set train.checkpoint_every=60 --name demo --out results

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: $(STAMP)
	$(BIN)/ruff check istr analysis tests
	$(BIN)/python -m pytest -q -ra tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check istr analysis tests

clean:
	rm -rf $(VENV) runs results datasets
