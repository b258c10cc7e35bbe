# The two README commands: `make demo` (main job: the ablation) and `make test` (the whole suite, what CI
# runs); `make test-fast` is the unit tier (tests not marked slow), the loop while editing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean

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

# ruff, then pytest with the given marker selection. pytest exits 5 when it collected no test: that is
# a failure here, not a pass.
define lint_and_test
	$(BIN)/ruff check istr analysis tests
	$(BIN)/python -m pytest -q -ra $(1) tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc
endef

test: $(STAMP)
	$(call lint_and_test,)

test-fast: $(STAMP)
	$(call lint_and_test,-m "not slow")

lint: $(STAMP)
	$(BIN)/ruff check istr analysis tests

clean:
	rm -rf $(VENV) runs results datasets
