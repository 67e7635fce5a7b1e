#!/usr/bin/env bash
# Fetch, on a machine with PyPI access, the pure-Python wheels that scripts/gpu_check.sh installs
# from .whl/ on an offline GPU machine whose python3 already has torch, typer, rich, numpy, pillow,
# safetensors and onnx (but not pydantic, pydantic-settings, lpips or diffusers).
#   bash scripts/gpu_wheels.sh [PYTHON_VERSION]   # default 3.12, the GPU machine's python3
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" -d .whl \
  pydantic pydantic-core pydantic-settings python-dotenv typing-inspection annotated-types \
  typing-extensions lpips diffusers importlib-metadata
ls .whl
