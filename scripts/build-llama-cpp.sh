#!/usr/bin/env bash
# Build the llama.cpp anchor (llama-bench, llama-batched-bench, llama-perplexity, llama-quantize,
# llama-completion, llama-server) from the llama.cpp tree vendored in the llama-cpp-python 0.3.36 source
# distribution, as in the baseline doc.
# Usage: scripts/build-llama-cpp.sh [DIR]   (default: .cache/llama.cpp); binaries end in DIR/build/bin.
# Only used for benchmarks and for recording reference figures; never by the test suite.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$root/.cache/llama.cpp}"
ver=0.3.36
targets="llama-bench llama-batched-bench llama-perplexity llama-quantize llama-completion llama-server"
configure() {
  cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >/dev/null
}
have() { for t in $targets; do [ -x "$dir/build/bin/$t" ] || return 1; done; }
if have; then exit 0; fi
if [ -f "$dir/build/build.ninja" ]; then
  (cd "$dir" && configure && ninja -C build -j"$(nproc)" $targets) && exit 0
fi
python3 -m pip install --quiet cmake ninja scikit-build-core
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python --no-build-isolation \
  "llama-cpp-python==$ver" -d "$work"
tar -xzf "$work/llama_cpp_python-$ver.tar.gz" -C "$work"
rm -rf "$dir"; mkdir -p "$(dirname "$dir")"
cp -r "$work/llama_cpp_python-$ver/vendor/llama.cpp" "$dir"
cd "$dir"
configure
ninja -C build -j"$(nproc)" $targets
