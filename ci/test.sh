#!/usr/bin/env bash
# deepport's test command: what `.ci/run` calls and what a developer runs.
#
#   ci/test.sh            install missing system packages (when root), then
#                         cargo fmt --check, clippy -D warnings, cargo test
#
# Environment:
#   DEEPPORT_REQUIRE  comma-separated backends that must be available; the
#                     tests turn "unavailable" into a failure for them.
#                     Defaults to the backends whose drivers this script
#                     installs (today: the CPU backends).
#   DEEPPORT_SKIP_APT=1  never call apt-get.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n== %s ==\n' "$*"; }

# System packages the tests need. Each later backend adds its driver here
# (e.g. mesa-vulkan-drivers for wgpu/vulkan on lavapipe) and its name to
# DEEPPORT_REQUIRE below.
APT_PACKAGES=(ca-certificates)

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

export DEEPPORT_REQUIRE="${DEEPPORT_REQUIRE:-cpu-ref,cpu}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Two cores: keep the build from starving the test threads.
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

log "toolchain"
cargo --version
rustc --version

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo test (required backends: $DEEPPORT_REQUIRE)"
cargo test --workspace --locked

log "done"
