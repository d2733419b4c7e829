#!/usr/bin/env bash
# The one command for a lent GPU machine (the device tool's `run`), from the repository root:
#   make gpu-wheels                       # here, once: .whl/ holds what the machine's image lacks (POT, tomli-w)
#   run(command="bash benchmarks/gpu_on_device.sh", carry=[".whl"], timeout_s=590)
# It installs the carried wheels, prints the GPU, runs benchmarks/gpu.py into $OUT (gpu.json, gpu.md, gpu.log);
# copy those into docs/results/ afterwards. Without $OUT it writes docs/results/ directly.
set -euo pipefail
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD/src" PYTHONUNBUFFERED=1
out="${OUT:-$PWD/docs/results}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
cd benchmarks
python3 gpu.py --out "$out" "$@" 2>&1 | tee "$out/gpu.log"
