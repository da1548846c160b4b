#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 10) on the seed corpus.
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-10}
./seed-corpus.sh
for t in safetensors checkpoint_config catalogue waivers report_files op_params; do
    echo "== fuzz $t for ${secs}s"
    cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=1024
done
