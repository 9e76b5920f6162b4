# AlphaEarth Height — set-up, demo, tests, benchmarks.
# Every target installs what it needs first; a second run reinstalls nothing.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3-qgis qgis-providers python3-rasterio python3-gdal gdal-bin \
                python3-venv python3-pip python3-matplotlib python3-scipy
APT_STAMP := $(VENV)/.apt-done
# Only for `make test`: the QGIS desktop and qgis_process (package qgis), a virtual
# display and screenshots for tests/desktop.
TEST_APT_PACKAGES := qgis xvfb xdotool imagemagick
TEST_APT_STAMP := $(VENV)/.apt-test-done
PIP_STAMP := $(VENV)/.pip-done
# The editable install is strict, a link tree of what the wheel ships (scripts/install_python.sh), so a
# file added to or removed from the package needs it again: the package's file list is a prerequisite,
# rewritten only when it changes.
PACKAGE_LIST := $(VENV)/.package-files
$(shell mkdir -p $(VENV) && find __init__.py cli.py metadata.txt plugin training resources -type f \
  ! -path '*/__pycache__/*' | LC_ALL=C sort > $(PACKAGE_LIST).new && \
  { cmp -s $(PACKAGE_LIST).new $(PACKAGE_LIST) || mv $(PACKAGE_LIST).new $(PACKAGE_LIST); }; rm -f $(PACKAGE_LIST).new)

.PHONY: setup demo test bench experiment clean-venv bundled-model package install-plugin

setup: $(PIP_STAMP)

$(APT_STAMP):
	@bash scripts/install_system.sh $(APT_PACKAGES)
	@mkdir -p $(VENV) && touch $@

$(TEST_APT_STAMP): $(APT_STAMP)
	@bash scripts/install_system.sh $(TEST_APT_PACKAGES)
	@touch $@

$(PIP_STAMP): $(APT_STAMP) pyproject.toml scripts/install_python.sh $(PACKAGE_LIST)
	@bash scripts/install_python.sh $(VENV)
	@touch $@

demo: setup
	rm -rf demo_output
	$(VENV)/bin/alphaearth-height demo --out demo_output

# AEH_REQUIRE_DESKTOP=1: the desktop tests fail (rather than skip) without their tools.
test: setup $(TEST_APT_STAMP)
	QT_QPA_PLATFORM=offscreen AEH_REQUIRE_DESKTOP=1 $(PY) -m pytest -q tests

bench: setup
	$(PY) bench/bench_predict.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_fetch.py
	$(PY) bench/bench_dask.py

# The paper's experiment on the demo scene (U-Net vs U-Net++ vs ridge), plus a U-Net++ relative to a
# synthetic coarse DEM and that DEM alone: three nets (the first two took about 8 min on 2 CPU cores).
experiment: setup
	rm -rf build/experiment
	$(VENV)/bin/alphaearth-height experiment --out build/experiment

clean-venv:
	rm -rf $(VENV)

# Re-trains the bundled model on the synthetic demo scene (about 20 min on 2 CPU cores).
BUNDLED := resources/models/demo-unetplusplus
bundled-model: setup
	rm -rf build/demo-scene
	$(VENV)/bin/alphaearth-height demo --scene-only --out build/demo-scene
	rm -rf $(BUNDLED)
	$(VENV)/bin/alphaearth-height train --embeddings build/demo-scene/embeddings.tif \
	  --reference build/demo-scene/reference_dsm.tif --out $(BUNDLED) \
	  --arch unetplusplus --encoder resnet18 --encoder-depth 4 --decoder-channels 96,48,24,16 \
	  --patch-size 128 --batch-size 8 --epochs 20 --steps-per-epoch 40 --patience 6 --seed 0 \
	  --name "U-Net++ (ResNet-18) - synthetic demo scene" \
	  --region "synthetic demo scene, EPSG:32630 near Bordeaux (not real data)" --year 2020 --device cpu

# The release zip (dist/alphaearth_height.zip) and its installation into a QGIS profile.
package: setup
	$(PY) scripts/package.py

# PROFILE=/path/to/QGIS/profile to install somewhere other than the default profile
install-plugin: package
	$(PY) scripts/install_plugin.py $(if $(PROFILE),--profile-dir $(PROFILE))
