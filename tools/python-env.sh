#!/usr/bin/env bash
# Creates tools/.venv with the pinned Python packages the tools need
# (tools/golden_megabyte.py: torch for float64 autograd, numpy, safetensors).
#
# Usage: bash tools/python-env.sh        (idempotent; re-running is cheap once installed)
#
# Why the full torch install: only PyPI is reachable, and PyPI's Linux x86_64 torch wheels are
# CUDA builds. Installing the wheel with --no-deps does not work: libtorch_cuda.so links
# against libcudart/libcublas/libcudnn/... from the nvidia-*-cu12 packages, so `import torch`
# fails without them. So torch is installed with its dependencies (about 3 GB downloaded,
# about 5 GB on disk); it runs fine on a CPU-only machine.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"

# Pinned versions: the fixtures in tests/fixtures/ were generated with exactly these.
packages=(
    "torch==2.5.1"
    "numpy==2.2.6"
    "safetensors==0.5.3"
)

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
fi

if "$venv/bin/python" - "${packages[@]}" <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    if have != want:
        sys.exit(1)
EOF
then
    echo "tools/.venv is up to date"
    exit 0
fi

"$venv/bin/pip" install --disable-pip-version-check --quiet "${packages[@]}"
"$venv/bin/python" -c "import torch, numpy, safetensors; print('torch', torch.__version__, 'numpy', numpy.__version__, 'safetensors', safetensors.__version__)"
