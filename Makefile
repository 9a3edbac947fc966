# The two set-up commands: `make demo` and `make test`. Both create or reuse .venv.
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-oldest install lint clean

$(VENV)/.installed-base: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV) ""
	touch $@

$(VENV)/.installed-test: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV) "test"
	touch $@ $(VENV)/.installed-base

install: $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	$(BIN)/python examples/demo.py

test: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench examples
	bash scripts/install-browser.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The same suite on the oldest supported versions of the dependencies (scripts/oldest.txt), in its own venv.
OLDEST := .venv-oldest
$(OLDEST)/.installed-test: pyproject.toml scripts/install.sh scripts/oldest.txt
	CONSTRAINTS=scripts/oldest.txt bash scripts/install.sh $(OLDEST) "test"
	touch $@

test-oldest: $(OLDEST)/.installed-test
	bash scripts/install-browser.sh
	$(OLDEST)/bin/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench examples

clean:
	rm -rf runs .pytest_cache
