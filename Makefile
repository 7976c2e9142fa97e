# Two commands do all set-up on a fresh machine with only Python and pip:
#   make demo   create .venv, install nbchat, fetch the default model, run the quick-start chat
#   make test   create/update .venv with the test extras and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench install labextension-test

# The JupyterLab extension (labextension/) is built by the editable install's build hook with Node.js;
# without Node.js, or with NBCHAT_SKIP_LABEXTENSION=1, everything else still installs and runs.
ifeq ($(NBCHAT_SKIP_LABEXTENSION)$(shell command -v node),)
  LABEXT_SKIPPED := no Node.js on this machine
else ifeq ($(NBCHAT_SKIP_LABEXTENSION),1)
  LABEXT_SKIPPED := NBCHAT_SKIP_LABEXTENSION=1
endif
LABEXT_BUILT := nbchat/labextension/package.json
LABEXT_SOURCES := labextension/package.json labextension/yarn.lock \
  $(wildcard labextension/src/*.ts labextension/style/* labextension/schema/*.json)
JLPM := PATH="$(abspath $(BIN)):$$PATH" $(abspath $(BIN))/jlpm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the project's dependencies change. The editable install builds the extension
# into nbchat/labextension; `labextension develop` links the venv's copy to it, so a rebuild shows on
# the next page reload.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
ifdef LABEXT_SKIPPED
	@echo "make install: the JupyterLab extension was skipped ($(LABEXT_SKIPPED)); replies show as Markdown"
else
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/jupyter labextension develop --overwrite . >/dev/null
endif
	touch $@

ifdef LABEXT_SKIPPED
install: $(VENV)/.installed
labextension-test:
	@echo "make test: the extension's jest tests were skipped ($(LABEXT_SKIPPED))"
else
install: $(VENV)/.installed $(LABEXT_BUILT)

# Rebuilt when its sources change after the install built it (jlpm's packages are installed then).
$(LABEXT_BUILT): $(LABEXT_SOURCES) | $(VENV)/.installed
	cd labextension && $(JLPM) install && $(JLPM) build
	touch $@

# The extension's TypeScript unit tests (jest): reply parsing, the code-block toolbar, highlighting.
labextension-test: install
	cd labextension && $(JLPM) test
endif

demo: install
	$(BIN)/nbchat pull
	$(BIN)/nbchat run notebooks/quickstart.ipynb

# pytest exits 5 when it collected no test: that must fail, never pass silently.
test: install labextension-test
	$(BIN)/nbchat pull
	$(BIN)/python -m pytest -q -rs --durations=15 $(PYTEST_ARGS); status=$$?; \
	  if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$status

lint: install
	$(BIN)/ruff check nbchat tests benchmarks

bench: install
	$(BIN)/python -m benchmarks.decode
