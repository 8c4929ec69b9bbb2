#!/usr/bin/env bash
# Build llama.cpp's own benchmark tool, llama-bench, from the sources vendored in the
# llama-cpp-python 0.3.36 sdist (the same llama.cpp the Python bindings and the GGUF export use).
# Output: $INTRASLICE_CACHE/llama-bench/bin/llama-bench (default ~/.cache/intraslice). Slow: it
# compiles ggml and llama (about 10 minutes on 2 cores); run it once, alone.
set -euo pipefail
cache="${INTRASLICE_CACHE:-$HOME/.cache/intraslice}"
sdist="$cache/sdist/llama_cpp_python-0.3.36.tar.gz"
[ -f "$sdist" ] || python -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$cache/sdist"
src="$cache/llama-bench/src"
if [ ! -f "$src/CMakeLists.txt" ]; then
  rm -rf "$src.tmp" && mkdir -p "$src.tmp"
  tar xzf "$sdist" -C "$src.tmp" --strip-components=3 llama_cpp_python-0.3.36/vendor/llama.cpp
  rm -rf "$src" && mv "$src.tmp" "$src"
fi
cmake -S "$src" -B "$cache/llama-bench/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF > /dev/null
cmake --build "$cache/llama-bench/build" --target llama-bench -j "${JOBS:-$(nproc)}"
mkdir -p "$cache/llama-bench/bin"
cp "$cache/llama-bench/build/bin/llama-bench" "$cache/llama-bench/bin/llama-bench"
echo "$cache/llama-bench/bin/llama-bench"
