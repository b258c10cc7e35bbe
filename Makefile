# The two README commands: `make demo` (main job: the ablation) and `make test` (the whole suite, what CI
# runs); `make test-fast` is the unit tier (tests not marked slow), the loop while editing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The attention ablation on the full tiny preset, one seed: the backbone is pretrained once, then the
# three cells train at once, one thread each (bf16 where the CPU has it) -> results/attention.md|tex|csv
# + figures/.
demo: $(STAMP)
	$(BIN)/python -m istr ablate --preset tiny --axes attention --seeds 1 --workers 3 --name demo --out results

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
