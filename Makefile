# AlphaEarth Height — set-up, demo, tests, benchmarks.
# Every target installs what it needs first; a second run reinstalls nothing.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3-qgis qgis-providers python3-rasterio python3-gdal gdal-bin \
                python3-venv python3-pip python3-matplotlib python3-scipy
APT_STAMP := $(VENV)/.apt-done
PIP_STAMP := $(VENV)/.pip-done

.PHONY: setup demo test bench clean-venv

setup: $(PIP_STAMP)

$(APT_STAMP):
	@bash scripts/install_system.sh $(APT_PACKAGES)
	@mkdir -p $(VENV) && touch $@

$(PIP_STAMP): $(APT_STAMP) pyproject.toml scripts/install_python.sh
	@bash scripts/install_python.sh $(VENV)
	@touch $@

demo: setup
	$(VENV)/bin/alphaearth-height demo --out demo_output

test: setup
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q tests

bench: setup
	$(PY) bench/bench_predict.py

clean-venv:
	rm -rf $(VENV)
