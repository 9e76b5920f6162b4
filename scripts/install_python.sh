#!/usr/bin/env bash
# Creates the venv from the system Python (so PyQGIS, GDAL and rasterio from Debian
# are visible) and installs the PyPI packages and this package (editable) into it.
set -euo pipefail
venv="$1"
sys_py=/usr/bin/python3
[ -x "$venv/bin/python" ] || "$sys_py" -m venv --system-site-packages "$venv"
py="$venv/bin/python"

# Debian's rasterio and GDAL are built against Debian's numpy: never let pip replace it.
constraints="$venv/constraints.txt"
"$sys_py" -c "import numpy; print(f'numpy=={numpy.__version__}')" > "$constraints"

pyver=$("$py" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
arch=$(uname -m)
if [ "$arch" = "aarch64" ]; then
  torch_pkgs=("torch==2.9.1" "torchvision==0.24.1")
else
  torch_pkgs=("torch==2.14.1" "torchvision==0.29.1")
fi
# onnx >= 1.18 needs ml_dtypes >= 0.5, which needs numpy 2: older numpy (Debian 12) keeps older onnx.
if "$sys_py" -c "import numpy, sys; sys.exit(int(numpy.__version__.split('.')[0]) >= 2)"; then
  onnx_pkgs=("onnx>=1.15,<1.18" "ml_dtypes<0.5")
else
  onnx_pkgs=("onnx>=1.15")
fi
echo "python packages: installing into $venv (Python $pyver, $arch)"
"$py" -m pip install -q --disable-pip-version-check -c "$constraints" "${torch_pkgs[@]}"
"$py" -m pip install -q --disable-pip-version-check -c "$constraints" \
  "segmentation-models-pytorch>=0.3,<0.7" "safetensors>=0.4" "tqdm>=4.60" "pytest>=7" "earthengine-api" \
  "onnxruntime>=1.17" "${onnx_pkgs[@]}"
"$py" -m pip install -q --disable-pip-version-check -c "$constraints" --no-deps -e .
"$py" -c "import alphaearth_height, torch, segmentation_models_pytorch, rasterio, onnx, onnxruntime; print('python packages: ready (torch', torch.__version__ + ')')"
