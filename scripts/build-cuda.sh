#!/usr/bin/env bash
# Builds fluoropose with the `cuda` feature (candle's CUDA kernels), release profile.
#
# With a CUDA toolkit installed (nvcc on PATH) this is plain cargo. Without one, e.g. on a build
# machine with no GPU, it takes NVIDIA's nvcc 13.0 from PyPI (13.0 matches driver 580; a newer
# nvcc writes PTX that older drivers refuse) and links against stubs of libcuda, cuBLAS and
# cuRAND that carry only their sonames and symbols, so the real libraries are the ones loaded
# where the binary runs. There, put the driver's and CUDA's libraries (and libcudart.so.13 from
# $FLUOROPOSE_CUDA_DIR/lib) on LD_LIBRARY_PATH.
#
#   scripts/build-cuda.sh                 # binary: $CARGO_TARGET_DIR/release/fluoropose
#   scripts/build-cuda.sh --test cuda     # extra cargo arguments pass through (tests: use
#                                         # `cargo test` with the same environment)
# CUDA_COMPUTE_CAP (default 90: Hopper) picks the GPU generation the kernels are built for.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

if ! command -v nvcc >/dev/null; then
    C=${FLUOROPOSE_CUDA_DIR:-$HOME/.cache/fluoropose/cuda13}
    if [ ! -x "$C/bin/nvcc" ]; then
        echo "no nvcc: fetching NVIDIA's CUDA 13.0 compiler from PyPI into $C"
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --platform manylinux2014_x86_64 -d "$tmp" \
            "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" \
            "nvidia-cuda-cccl==13.0.*" "nvidia-nvvm==13.0.*"
        for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$tmp/x"; done
        mkdir -p "$C"
        cp -r "$tmp"/x/nvidia/cu13/. "$C"/
        chmod +x "$C"/bin/* "$C"/nvvm/bin/*
        ln -sf libcudart.so.13 "$C/lib/libcudart.so"
    fi
    if [ ! -f "$C/stubs/libcublas.so" ]; then
        # The symbols cudarc (the CUDA binding under candle) can call, read from its sources.
        cargo fetch -q
        cudarc=$(cargo metadata --format-version 1 --features cuda | python3 -c '
import json, os, sys
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')
        mkdir -p "$C/stubs"
        stub() { # library soname cudarc-module
            grep -ohE 'pub unsafe fn [A-Za-z0-9_]+\(' "$cudarc/src/$3/sys/"*.rs |
                sed -E 's/pub unsafe fn ([A-Za-z0-9_]+)\(/void \1(void) {}/' | sort -u >"$C/stubs/$1.c"
            cc -shared -fPIC -o "$C/stubs/$1.so" -Wl,-soname,"$2" "$C/stubs/$1.c"
        }
        stub libcuda libcuda.so.1 driver
        stub libcublas libcublas.so.13 cublas
        stub libcublasLt libcublasLt.so.13 cublaslt
        stub libcurand libcurand.so.10 curand
        stub libnvrtc libnvrtc.so.13 nvrtc
    fi
    export PATH=$C/bin:$PATH CUDA_HOME=$C
    export LIBRARY_PATH=$C/lib:$C/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
fi
cargo build --release --features cuda "$@"
