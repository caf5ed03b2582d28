# Everything a fresh machine needs, in two commands:  `make lab`  (the workbench)  and  `make test`  (the suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: lab headless test test-gpu bench kernel clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[notebook,dev]"
	touch $(STAMP)

kernel: $(STAMP)
	$(PY) -m workbench kernel install

# Main job: JupyterLab on the quickstart notebook, in the "Clockwork Workbench" kernel.
lab: kernel
	$(VENV)/bin/jupyter lab notebooks/01_quickstart.ipynb

# Main job without a browser: run the quickstart notebook unattended and export its report.
headless: kernel
	$(PY) -m workbench notebook notebooks/01_quickstart.ipynb --out reports/quickstart

# The whole test suite (GPU tests skip with their reason where no CUDA device exists).
test: $(STAMP)
	@command -v chromium >/dev/null || ( (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "note: could not install Debian chromium; browser tests will skip" )
	$(PY) -m pytest

test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
