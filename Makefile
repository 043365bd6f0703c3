# The README's two commands: `make demo` and `make test`. Both install into ./.venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Where no NVIDIA driver is found, take the CPU build of torch (on the project's dev machines it
# lies on local disk); on a GPU machine let pip choose a CUDA build. Override with TORCH_SPEC=...
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: install install-runtime check-runtime demo serve test test-fast test-slow bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e '.[dev]'
	touch $@

# The serving image's install (Dockerfile): the package alone, without the test and bench tools.
install-runtime: $(VENV)/.installed-runtime

$(VENV)/.installed-runtime: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet .
	touch $@

# The installed package without the dev extras: the server and the experiments import, and the
# command runs (CI runs this after the tests, in a venv of its own).
RUNTIME_VENV ?= .venv-runtime
check-runtime:
	$(MAKE) --no-print-directory install-runtime VENV=$(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/python -c "import expo_serve.server.app, expo_serve.server.runner, expo_serve.experiments, expo_serve.cli, expo_serve.llm, expo_serve.alpha_sweep, expo_serve.engine.tp_workers"
	$(RUNTIME_VENV)/bin/python -c "from importlib.resources import files; assert files('expo_serve.alpha_sweep').joinpath('judge_prompt.txt').read_text().strip()"
	$(RUNTIME_VENV)/bin/python -c "from expo_serve.server.middleware import login_page; from expo_serve.experiments.dashboard import render_notice; login_page(200); render_notice('ok')"
	$(RUNTIME_VENV)/bin/expo-serve --help >/dev/null

demo: install
	$(VENV)/bin/expo-serve demo

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
