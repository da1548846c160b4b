#!/usr/bin/env bash
# ci/html_check.sh RUN_DIR...: loads RUN_DIR/report.html (written by
# `deepport run --report RUN_DIR`) in headless chromium and fails on a
# JavaScript error, a console message or a CSP violation (the page records
# them in #js-errors), a script that did not run to its end, a page without
# an SVG, a reference to anything outside the file, or a matrix without exactly one cell per case x backend of
# RUN_DIR/results.jsonl. Without chromium it skips, unless DEEPPORT_REQUIRE
# names `chromium`. DEEPPORT_CHROMIUM names the binary if not on PATH.
set -euo pipefail

browser="${DEEPPORT_CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}"
if [ -z "$browser" ]; then
  case ",${DEEPPORT_REQUIRE:-}," in
    *,chromium,*) echo "html_check: DEEPPORT_REQUIRE names chromium, but no chromium is installed" >&2; exit 1 ;;
  esac
  echo "html_check: skipped: no chromium (install Debian's chromium or set DEEPPORT_CHROMIUM)"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
status=0
for dir in "$@"; do
  page="$dir/report.html"
  bad=0
  fail() { echo "html_check: $page: $*" >&2; bad=1; status=1; }
  if [ ! -f "$page" ] || [ ! -f "$dir/results.jsonl" ]; then
    fail "missing (or no results.jsonl beside it)"
    continue
  fi
  "$browser" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run \
    --enable-logging=stderr --v=0 --user-data-dir="$work/profile" \
    --dump-dom "file://$(realpath "$page")" >"$work/dom" 2>"$work/log" || fail "chromium exited with $?"
  if grep -q ':CONSOLE' "$work/log"; then
    fail "console messages:"; grep ':CONSOLE' "$work/log" | head -n 20 >&2
  fi
  grep -q '<pre id="js-errors" hidden=""></pre>' "$work/dom" || fail "recorded JavaScript errors: $(grep -o '<pre id="js-errors".\{0,400\}' "$work/dom")"
  grep -q 'data-ready="1"' "$work/dom" || fail "its script did not run to its end"
  grep -q '<svg' "$work/dom" || fail "no SVG"
  if grep -o -i -E '.{0,30}(//|https?:|file:|src=|href=|srcset|@import|url\(|<link|<img|<iframe|<object|<embed).{0,30}' "$page" >"$work/refs"; then
    fail "refers to something outside the file:"; head -n 10 "$work/refs" >&2
  fi
  want="$(python3 -c '
import json, sys
ids, backends = set(), set()
for line in open(sys.argv[1]):
    if line.strip():
        r = json.loads(line)
        ids.add(r["id"]); backends.add(r["backend"])
print(len(ids) * max(len(backends), 1))' "$dir/results.jsonl")"
  got="$(grep -o '<td class="c ' "$work/dom" | wc -l)"
  [ "$got" -eq "$want" ] || fail "$got matrix cells, expected $want (cases x backends)"
  [ "$bad" -eq 1 ] || echo "html_check: $page: loads cleanly, $got cells"
done
exit "$status"
