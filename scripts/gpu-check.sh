#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the CUDA tests, then the grouped-clients benchmark on the GPU and the CPU.
# A few minutes. torch must see the GPU (a CUDA build of torch): the project installs the CPU build, so
#   .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126   (or a local wheel)
# first, where the machine has one; without a GPU the CUDA tests skip and the benchmark measures the CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
"$PY" -m pytest -q -rs tests/test_grouped.py
"$PY" benchmarks/grouped.py --clients 10,50,100
