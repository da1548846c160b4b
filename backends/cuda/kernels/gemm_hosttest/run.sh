#!/bin/sh
# Host emulation tests of the kernels (no GPU needed; fp8_sm90 models TMA,
# mbarrier and wgmma, see its header): each CTA runs
# as std::threads with a std::barrier for __syncthreads, against double /
# independent references. fp8_encode checks every f32 bit pattern (minutes).
# Usage: sh run.sh [--all]   (from any directory)
set -e
cd "$(dirname "$0")"
O=${TMPDIR:-/tmp}/gemm_hosttest; mkdir -p "$O"
CXX="${CXX:-g++} -std=c++20 -O2 -pthread -Wno-psabi"
$CXX -o "$O/gemm_tiled" gemm_tiled.cpp && "$O/gemm_tiled"
$CXX -o "$O/quant_act" quant_act.cpp && "$O/quant_act"
$CXX -o "$O/fp8_sm90" fp8_sm90.cpp && "$O/fp8_sm90"
if [ "$1" = "--all" ]; then $CXX -o "$O/fp8_encode" fp8_encode.cpp && "$O/fp8_encode"; fi
