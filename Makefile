# Two commands do all set-up on a fresh machine with only Python and pip:
#   make demo   create .venv, install nbchat, fetch the default model, run the quick-start chat
#   make test   create/update .venv with the test extras and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the project's dependencies change.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/nbchat pull
	$(BIN)/nbchat run notebooks/quickstart.ipynb

# pytest exits 5 when it collected no test: that must fail, never pass silently.
test: install
	$(BIN)/nbchat pull
	$(BIN)/python -m pytest -q -rs --durations=15 $(PYTEST_ARGS); status=$$?; \
	  if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$status

lint: install
	$(BIN)/ruff check nbchat tests benchmarks

bench: install
	$(BIN)/python -m benchmarks.decode
