# Everything a fresh machine needs, in two commands:  `make lab`  (the workbench)  and  `make test`  (the suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# The simulation core (clock, controller, emulated worker) compiled with mypyc, 2.5x faster in virtual time
# (setup.py); rebuilt whenever one of its sources changes. The .py files stay the source and the fallback.
CORE     := workbench/controller/compiled.json
CORE_SRC := setup.py workbench/clock.py $(wildcard workbench/controller/*.py) workbench/worker/emulated_lean.py \
            workbench/telemetry/row_writer.py

.PHONY: lab headless test test-gpu bench kernel clean clean-compiled

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=70.1" wheel "mypy==2.4.1"
	$(PY) -m pip install -q -e ".[notebook,dev]"
	touch $(STAMP)

$(CORE): $(STAMP) $(CORE_SRC)
	WORKBENCH_COMPILE=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e . || { $(PY) setup.py -q \
	  clean_compiled; echo "note: the simulation core did not compile (no C compiler?): it runs as pure Python"; }

kernel: $(CORE)
	$(PY) -m workbench kernel install

# Main job: JupyterLab on the quickstart notebook, in the "Clockwork Workbench" kernel.
lab: kernel
	$(VENV)/bin/jupyter lab notebooks/01_quickstart.ipynb

# Main job without a browser: run the quickstart notebook unattended and export its report.
headless: kernel
	$(PY) -m workbench notebook notebooks/01_quickstart.ipynb --out reports/quickstart

# The whole test suite (GPU tests skip with their reason where no CUDA device exists).
test: $(CORE)
	@command -v chromium >/dev/null || ( (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "note: could not install Debian chromium; browser tests will skip" )
	$(PY) -m pytest

test-gpu: $(CORE)
	$(PY) -m pytest -m gpu

bench: $(CORE)
	$(PY) -m bench

clean-compiled:
	-$(PY) setup.py clean_compiled

clean: clean-compiled
	rm -rf $(VENV) .pytest_cache build *.egg-info
