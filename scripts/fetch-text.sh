#!/usr/bin/env bash
# Fetch the text splits elastica ranks, trains and evaluates on: the Python 3.11 documentation
# sources from Debian's python3.11-doc package (PSF license), cleaned to plain text.
# Writes data/{calib,train,eval}.txt; eval (tutorial + FAQ) is never seen by ranking or training.
# Usage: scripts/fetch-text.sh [OUT_DIR]   (default: data/)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/data}"
if [ -s "$out/calib.txt" ] && [ -s "$out/train.txt" ] && [ -s "$out/eval.txt" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download python3.11-doc >/dev/null 2>&1) \
  || { echo "error: could not download the python3.11-doc package with apt-get (is the Debian package registry reachable?)" >&2; exit 1; }
dpkg-deb -x "$tmp"/python3.11-doc_*.deb "$tmp/x"
ls "$tmp"/python3.11-doc_*.deb | sed 's/.*\///' > "$tmp/version"
mkdir -p "$out"
python3 "$root/tools/data/prepare_text.py" "$tmp/x/usr/share/doc/python3.11/html/_sources" "$out"
cp "$tmp/version" "$out/SOURCE"
