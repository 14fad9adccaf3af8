#!/usr/bin/env bash
# A Python venv with the official `openai` client (and the HTTP client it brings), for the server's
# tests and the serving benchmark's load generator. Prints the venv's python on stdout.
# Usage: scripts/setup-openai-venv.sh [DIR]   (default: .cache/venv-openai). Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$root/.cache/venv-openai}"
pin="openai==3.57.0"
py="$dir/bin/python"
if [ -x "$py" ] && "$py" -c 'import openai, sys; sys.exit(openai.__version__ != "3.57.0")' 2>/dev/null; then
  echo "$py"; exit 0
fi
rm -rf "$dir.tmp-$$"
python3 -m venv "$dir.tmp-$$" >&2 \
  || { echo "error: python3 -m venv failed (install the python3-venv package)" >&2; exit 1; }
"$dir.tmp-$$/bin/python" -m pip install --quiet --disable-pip-version-check "$pin" >&2 \
  || { rm -rf "$dir.tmp-$$"; echo "error: pip could not install $pin (is the package registry reachable?)" >&2; exit 1; }
rm -rf "$dir"
mv "$dir.tmp-$$" "$dir"
echo "$py"
