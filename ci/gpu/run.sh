#!/usr/bin/env bash
# deepport on a GPU machine: the one command a machine with a Hopper GPU
# (or an AMD Instinct: `ci/gpu/run.sh rocm`) runs, in under 10 minutes.
#
#   ci/gpu/run.sh [BACKEND] [OUT]
#
#   BACKEND  cuda (default) or rocm (any other backend of `deepport
#            list` runs the same steps without the device ones, which is
#            how the script itself is checked on a machine without a GPU)
#   OUT      output directory (default target/gpu/BACKEND-<UTC time>)
#
# Steps, each logged to OUT/<step>.log, each with its own time limit:
#   build     cargo build --release (skipped when DEEPPORT_BIN names a
#             prebuilt `deepport`, e.g. on a machine without crates.io)
#   device    nvidia-smi (or rocm-smi) and `deepport --version`
#   list      deepport list --json: the backend must be available
#   kernels   deepport kernels for the device's architecture (cuda: PTX,
#             cubin; rocm: .hsaco code objects for the gfx name rocminfo
#             reports; manifest.json under OUT/kernels)
#   mustpass  deepport run --profile v3-mustpass --report OUT/mustpass,
#             then deepport verify on it (a V3 claim: no Fail, no
#             NotSupported)
#   forward-{f32,bf16,fp8}
#             deepport forward on golden/model, judged against its golden
#             data per layer (f32 end to end; bf16/fp8 teacher-forced)
#   bench     deepport bench --grid deepseek --format json (DeepGEMM's and
#             FlashMLA's shapes) into OUT/bench.jsonl
#
# A failing step does not stop the run; the summary (OUT/summary.txt,
# printed at the end) lists every step with its status and time, and the
# exit status is 1 when any step failed.
#
# Environment: DEEPPORT_BIN (a prebuilt deepport), DEEPPORT_NVRTC (the
# NVRTC library, when the loader cannot find it), DEEPPORT_GOLDEN (golden
# data directory; default golden/ of this tree), DEEPPORT_BENCH_SECS
# (min time per bench case, default 0.2), DEEPPORT_GPU_SECS (the whole
# run's budget, default 570: each step's limit is cut to what is left).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2

backend="${1:-cuda}"
case "$backend" in
  "" | -*) echo "usage: ci/gpu/run.sh [cuda|rocm] [OUT]" >&2; exit 2 ;;
esac
out="${2:-target/gpu/$backend-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out" || exit 2
out="$(cd "$out" && pwd)"
golden="${DEEPPORT_GOLDEN:-$PWD/golden}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
export CARGO_TERM_COLOR=never
# The backend under test must be available: "unavailable" is a failure.
export DEEPPORT_REQUIRE="${DEEPPORT_REQUIRE:-$backend}"

summary="$out/summary.txt"
: > "$summary"
failed=0
start_all=$SECONDS

budget="${DEEPPORT_GPU_SECS:-570}"

# step NAME LIMIT_SECONDS CMD...: runs CMD with its output in OUT/NAME.log
# (and on the terminal), records its status. The limit is cut to what is
# left of the run's budget; with nothing left the step is a TIMEOUT.
step() {
  local name="$1" limit="$2"
  shift 2
  local left=$((budget - (SECONDS - start_all)))
  if [ "$left" -lt 5 ]; then
    printf '%-14s %-18s %5s   %s\n' "$name" "TIMEOUT" "-" "no time left of ${budget}s" >> "$summary"
    failed=1
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  printf '\n== %s (limit %ss) ==\n' "$name" "$limit"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  local status=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    status="TIMEOUT"
  elif [ "$rc" != 0 ]; then
    status="FAILED (exit $rc)"
  fi
  [ "$status" = ok ] || failed=1
  printf '%-14s %-18s %5ss  %s\n' "$name" "$status" "$((SECONDS - t0))" "$out/$name.log" >> "$summary"
  return 0
}

skip() {
  printf '%-14s %-18s %5s   %s\n' "$1" "skipped" "-" "$2" >> "$summary"
}

# --- build
if [ -n "${DEEPPORT_BIN:-}" ]; then
  bin="$DEEPPORT_BIN"
  skip build "DEEPPORT_BIN=$bin"
else
  bin="$PWD/target/release/deepport"
  step build 300 cargo build --release --locked -p deepport-conformance --bin deepport
fi
if [ ! -x "$bin" ]; then
  echo "no deepport binary at $bin; stopping" >&2
  cat "$summary"
  exit 1
fi

# --- the device
if [ "$backend" = cuda ]; then
  step device 30 bash -c "nvidia-smi && '$bin' --version"
  # sm_90a on Hopper (compute capability 9.0), sm_XY elsewhere.
  cc="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')"
  case "$cc" in
    90) arch=sm_90a ;;
    [0-9][0-9] | [0-9][0-9][0-9]) arch="sm_$cc" ;;
    *) arch=sm_90a ;;
  esac
elif [ "$backend" = rocm ]; then
  step device 30 bash -c "rocm-smi && '$bin' --version"
  # The first GPU agent's gfx name (gfx90a, gfx942, …), as hiprtc gets it;
  # DEEPPORT_HIP_ARCH (which the backend also honours) wins.
  arch="${DEEPPORT_HIP_ARCH:-$(rocminfo 2>/dev/null | grep -o -m 1 'gfx[0-9a-f]*' || true)}"
  arch="${arch:-gfx90a}"
else
  step device 30 "$bin" --version
fi

# --- is the backend there?
# `deepport list --json`; the backend (or its first device, NAME:0) must
# say available.
# shellcheck disable=SC2329 # run by `step` through bash -c
list_check() {
  "$bin" list --json > "$out/list.json" || return 1
  cat "$out/list.json"
  # One object per row; keys in any order.
  awk -v want="$backend" '
    /^ *\{/ { avail = 0; named = 0 }
    /"available": *true/ { avail = 1 }
    /"name": *"/ { n = $0; sub(/.*"name": *"/, "", n); sub(/".*/, "", n); sub(/:[0-9]+$/, "", n); if (n == want) named = 1 }
    /^ *\}/ { if (avail && named) found = 1 }
    END { exit found ? 0 : 1 }' "$out/list.json" || {
    echo "backend $backend is not available here (see the reason above)"
    return 1
  }
}
export -f list_check
export bin out backend
step list 60 bash -c list_check

# --- kernels, compiled for this device (what the backend will load)
if [ "$backend" = cuda ] || [ "$backend" = rocm ]; then
  step kernels 60 "$bin" kernels --backend "$backend" --arch "$arch" --out "$out/kernels"
else
  skip kernels "no $backend kernel compiler in deepport kernels yet"
fi

# --- conformance: the V3 must-pass profile, then the submission check
step mustpass 240 "$bin" run --backend "$backend" --profile v3-mustpass --report "$out/mustpass"
if [ -f "$out/mustpass/results.jsonl" ]; then
  step verify 60 "$bin" verify "$out/mustpass"
else
  skip verify "no mustpass report"
fi

# --- the model: golden/model's tiny DeepSeek-V3, judged per layer
for mode in f32 bf16 fp8; do
  step "forward-$mode" 60 "$bin" forward --backend "$backend" \
    --checkpoint "$golden/model" --golden "$golden/model" --mode "$mode" \
    --out "$out/forward-$mode.safetensors"
done

# --- performance on DeepSeek's shapes
step bench 120 bash -c "'$bin' bench --backend '$backend' --grid deepseek --format json \
  --min-time '${DEEPPORT_BENCH_SECS:-0.2}' --max-iters 20 > '$out/bench.jsonl'; rc=\$?; \
  cat '$out/bench.jsonl'; exit \$rc"

{
  echo
  echo "backend $backend, $((SECONDS - start_all))s in all, output in $out"
  if [ "$failed" = 0 ]; then echo "gpu run: every step passed"; else echo "gpu run: FAILED"; fi
} >> "$summary"
printf '\n== summary ==\n'
cat "$summary"
exit "$failed"
