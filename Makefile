# The two README commands: `make demo` (main job: the ablation) and `make test` (the whole suite, what CI
# runs); `make test-fast` is the unit tier (tests not marked slow), the loop while editing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo tables test test-fast lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The attention ablation on the full tiny preset, one seed: the backbone is pretrained once, then the
# three cells train at once, one thread each (bf16 where the CPU has it) -> results/demo/attention.md|tex|csv
# + figures/.
demo: $(STAMP)
	$(BIN)/python -m istr ablate --preset tiny --axes attention --seeds 1 --workers 3 --name demo

# The four ablation tables of results/tiny/ and their figures, rebuilt from its committed cell archive
# (results/tiny/cells/); trains nothing. The run that fills the archive: README, "What the ablations show".
TINY_ABLATION := --preset tiny --seeds 5 --delta 1.5 --workers 2
tables: $(STAMP)
	$(BIN)/python -m istr ablate $(TINY_ABLATION) --tables-only

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
	rm -rf $(VENV) runs datasets
	find results -mindepth 1 -maxdepth 1 ! -name tiny -exec rm -rf {} + 2>/dev/null || true
