#!/usr/bin/env bash
# Creates the venv from the system Python (so PyQGIS, GDAL and rasterio from Debian
# are visible) and installs the PyPI packages and this package (editable) into it.
# The package lists are the ones pyproject.toml reads (resources/requirements/): core and
# every extra (train, onnx, earthengine, dask), plus pytest; only the pins below are added here.
set -euo pipefail
venv="$1"
root="$(cd "$(dirname "$0")/.." && pwd)"
reqs="$root/resources/requirements"
sys_py=/usr/bin/python3
[ -x "$venv/bin/python" ] || "$sys_py" -m venv --system-site-packages "$venv"
py="$venv/bin/python"

# Debian's rasterio and GDAL are built against Debian's numpy: never let pip replace it.
constraints="$venv/constraints.txt"
"$sys_py" -c "import numpy; print(f'numpy=={numpy.__version__}')" > "$constraints"
# onnx >= 1.18 needs ml_dtypes >= 0.5, which needs numpy 2: older numpy (Debian 12) keeps older onnx.
if "$sys_py" -c "import numpy, sys; sys.exit(int(numpy.__version__.split('.')[0]) >= 2)"; then
  cat "$reqs/constraints-numpy1.txt" >> "$constraints"
fi

pyver=$("$py" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
arch=$(uname -m)
# The PyTorch builds this project is tested with (the lists only ask for torch >= 2.1).
if [ "$arch" = "aarch64" ]; then
  printf '%s\n' "torch==2.9.1" "torchvision==0.24.1" >> "$constraints"
else
  printf '%s\n' "torch==2.14.1" "torchvision==0.29.1" >> "$constraints"
fi
echo "python packages: installing into $venv (Python $pyver, $arch)"
"$py" -m pip install -q --disable-pip-version-check -c "$constraints" \
  -r "$reqs/core.txt" -r "$reqs/train.txt" -r "$reqs/onnx.txt" -r "$reqs/earthengine.txt" -r "$reqs/dask.txt" "pytest>=7"
# strict: a link tree of exactly what the wheel ships (tests/, bench/, scripts/ are not importable
# as alphaearth_height.tests…); a new module needs this again, which the Makefile does.
"$py" -m pip install -q --disable-pip-version-check -c "$constraints" --no-deps \
  --config-settings editable_mode=strict -e "$root"
"$py" -c "import alphaearth_height, torch, segmentation_models_pytorch, rasterio, onnx, onnxruntime, ee, distributed; print('python packages: ready (torch', torch.__version__ + ')')"
