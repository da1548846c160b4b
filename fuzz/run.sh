#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 10) on a seed corpus of
# real files (seed-corpus.sh).
#
# Builds the libFuzzer binaries with stable Rust: the coverage
# instrumentation cargo-fuzz adds (`-Cpasses=sancov-module` and the
# sanitizer-coverage LLVM options) is stable codegen, so neither nightly nor
# cargo-fuzz is needed. There is no AddressSanitizer in this build (that
# needs nightly: `cargo +nightly fuzz run TARGET` does it); Rust code is
# memory-safe, and what this run catches is panics, aborts, overflow
# (debug assertions and overflow checks are on), allocation beyond
# -malloc_limit_mb, and hangs (-timeout).
#
# Exit status: 0 when every target ran its time without a finding; the
# crashing input is left in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-10}
targets=(safetensors checkpoint_config catalogue waivers report_files op_params token_list shard_index)
host=$(rustc -vV | sed -n 's/^host: //p')
# An explicit --target keeps the instrumentation off build scripts and
# proc-macros, as cargo-fuzz does.
RUSTFLAGS="--cfg fuzzing -Cdebug-assertions -Coverflow-checks \
 -Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares" \
  cargo build --release --target "$host" --bins
./seed-corpus.sh
mkdir -p artifacts
for t in "${targets[@]}"; do
    echo "== fuzz $t for ${secs}s"
    mkdir -p "artifacts/$t" "work/$t"
    # work/<t> receives new inputs; corpus/<t> (the seeds) is read only.
    "target/$host/release/$t" "work/$t" "corpus/$t" \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 2>&1 | tail -n 12
done
