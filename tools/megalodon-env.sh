#!/usr/bin/env bash
# Creates tools/.venv-megalodon with the pinned packages of the MEGALODON tools:
#   tools/golden_megalodon.py       (megalodon-jax reference -> tests/fixtures/megalodon_*.safetensors)
#   tools/bench_megalodon_peers.py  (megalodon-jax CPU training/decoding throughput; optax AdamW)
#
# Usage: bash tools/megalodon-env.sh      (idempotent; re-running is cheap once installed)
#
# JAX is the CPU build (jaxlib wheels from PyPI are CPU-only; no CUDA packages are pulled in).
# About 150 MB downloaded. The venv is gitignored by /tools/.venv*.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-megalodon"
python="${PYTHON:-python3}"

# Pinned versions: the fixtures in tests/fixtures/megalodon_*.safetensors were generated with
# exactly these. megalodon-jax 0.2.2 requires jax >= 0.10.2, < 0.11.
packages=(
    "megalodon-jax==0.2.2"
    "jax==0.10.2"
    "jaxlib==0.10.2"
    "equinox==0.13.8"
    "optax==0.2.8"
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
    echo "tools/.venv-megalodon is up to date"
    exit 0
fi

"$venv/bin/pip" install --disable-pip-version-check --quiet "${packages[@]}"
"$venv/bin/python" -c "import jax, megalodon_jax, optax, numpy, safetensors; from importlib.metadata import version; print('jax', jax.__version__, 'megalodon-jax', version('megalodon-jax'), 'optax', optax.__version__, 'numpy', numpy.__version__, 'safetensors', safetensors.__version__, 'devices', jax.devices())"
