#!/usr/bin/env bash
# Creates tools/.venv-peers: a CPU-usable PyTorch plus megabyte-pytorch, for
# tools/bench_megabyte_peers.py.
#
# Why not a plain `pip install torch`: the only torch wheels PyPI has for Linux x86-64 are
# the CUDA builds, and pip then pulls about 3 GB of nvidia-* packages (cuDNN, cuBLAS, NCCL,
# ...) that a CPU benchmark never calls. Instead this installs the torch wheel alone
# (--no-deps, ~900 MB download) and its small pure-Python dependencies, and, because the
# wheel's libraries are linked against the CUDA libraries (they must be present for
# `import torch` to succeed), builds do-nothing stand-ins for them: one tiny shared
# library per missing CUDA library, with the same soname, symbol versions and symbols, whose
# functions all return cudaErrorNoDevice (100). torch then imports, reports
# torch.cuda.is_available() == False, and runs its CPU kernels (MKL, oneDNN) unchanged.
# Needs a C compiler (`cc`) and binutils (`readelf`, `nm`).
#
# PEERS_TORCH_FULL=1 installs torch with all its dependencies instead (multi-GB, no stubs).
#
# Usage: bash tools/peers-env.sh            (idempotent; re-run to repair)
#        tools/.venv-peers/bin/python tools/bench_megabyte_peers.py --quick
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-peers"
python="${PYTHON:-python3}"

# Pinned versions (what was tested; see docs/perf-peers-draft.md).
torch_version="2.9.1"
torch_pure_deps=(filelock==4.2.12 typing-extensions==4.16.0 sympy==1.14.0 mpmath==1.3.0
  networkx==3.6.1 jinja2==3.1.6 markupsafe==3.0.4 fsspec==2026.9.0 numpy==2.4.6)
megabyte_deps=(megabyte-pytorch==0.3.6 einops==0.8.2 beartype==0.23.1 packaging==26.3
  tqdm==4.70.1)

if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

if [[ "${PEERS_TORCH_FULL:-0}" == "1" ]]; then
  "${pip[@]}" "torch==$torch_version"
else
  "${pip[@]}" --no-deps "torch==$torch_version"
  "${pip[@]}" --no-deps "${torch_pure_deps[@]}"
fi
"${pip[@]}" --no-deps "${megabyte_deps[@]}"

torch_dir="$("$venv/bin/python" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("torch").origin))')"

if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  echo "peers-env: torch does not import without the CUDA libraries; building stand-ins in $torch_dir/lib"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  "$venv/bin/python" - "$torch_dir" "$work" <<'PY'
"""Build stand-in shared libraries for the CUDA libraries torch's ELF files need but lack."""
import glob
import os
import re
import shutil
import subprocess
import sys

torch_dir, work = sys.argv[1], sys.argv[2]
lib_dir = os.path.join(torch_dir, "lib")


def run(*args):
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


elfs = [p for p in glob.glob(os.path.join(torch_dir, "**", "*.so*"), recursive=True)
        if os.path.isfile(p) and open(p, "rb").read(4) == b"\x7fELF"]
present = {os.path.basename(p) for p in elfs}
system = {}
for line in run("ldconfig", "-p").splitlines():
    m = re.match(r"\s*(\S+) \(libc6,x86-64[^)]*\) => (\S+)", line)
    if m:
        system.setdefault(m.group(1), m.group(2))


def dynsyms(path, flag):
    rows = [line.split() for line in run("nm", "-D", flag, path).splitlines()]
    # Weak undefined symbols ("w", e.g. __gmon_start__) may stay unresolved: skip them.
    return [r[-1] for r in rows if len(r) >= 2 and r[-2] != "w"]


needed, undefined, defined = {}, {}, set()
for p in elfs:
    needed[p] = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", run("readelf", "-d", p))
    undefined[p] = dynsyms(p, "--undefined-only")
    defined |= {s.split("@")[0] for s in dynsyms(p, "--defined-only")}
missing = sorted({n for p in elfs for n in needed[p] if n not in present and n not in system})
for n in {n for p in elfs for n in needed[p] if n in system}:
    defined |= {s.split("@")[0] for s in dynsyms(system[n], "--defined-only")}

toolchain_version = re.compile(r"^(GLIBC|GLIBCXX|CXXABI|GCC|GOMP|OMP)_")
stubs = {lib: {} for lib in missing}  # library -> {symbol: version node}
for p in elfs:
    missing_here = [n for n in needed[p] if n in stubs]
    for sym in undefined[p]:
        name, _, version = sym.partition("@")
        version = version.lstrip("@")
        if version and toolchain_version.match(version):
            continue
        if version in stubs:  # CUDA libraries version their symbols by soname
            stubs[version][name] = version
            continue
        if not version and name in defined:
            continue
        for lib in missing_here:  # unversioned (or private version): any needed stub may serve
            stubs[lib].setdefault(name, version or lib)

for lib, symbols in stubs.items():
    src, script = os.path.join(work, lib + ".c"), os.path.join(work, lib + ".map")
    with open(src, "w") as f:
        f.write('static const char message[] = "CUDA is not available (stand-in library)";\n')
        for name in sorted(symbols):
            if re.search(r"Error(String|Name)$", name):
                f.write(f"const char *{name}(void) {{ return message; }}\n")
            else:  # 100 = cudaErrorNoDevice; torch treats it as "no GPU"
                f.write(f"long {name}(void) {{ return 100; }}\n")
    nodes = {}
    for name, node in symbols.items():
        nodes.setdefault(node, []).append(name)
    with open(script, "w") as f:
        for node, names in nodes.items():
            f.write(node + " {\n  global:\n" + "".join(f"    {n};\n" for n in sorted(names)) + "};\n")
    out = os.path.join(work, lib)
    subprocess.run(["cc", "-shared", "-fPIC", "-O0", "-w", "-o", out, src,
                    f"-Wl,-soname,{lib}", f"-Wl,--version-script={script}"], check=True)
    shutil.copy(out, os.path.join(lib_dir, lib))
    print(f"  stand-in {lib}: {len(symbols)} symbols")
PY
fi

"$venv/bin/python" - <<'PY'
import torch
import MEGABYTE_pytorch  # noqa: F401

a = torch.randn(64, 64)
assert torch.allclose(a @ torch.eye(64), a)
print(f"peers-env: torch {torch.__version__} imports; cuda available: {torch.cuda.is_available()}; "
      f"threads: {torch.get_num_threads()}; megabyte-pytorch imports")
PY
