#!/usr/bin/env bash
# Lays out a seed corpus of real files of this tree under fuzz/corpus/<target>/
# (not committed: it is rebuilt from the tree each time).
set -euo pipefail
cd "$(dirname "$0")"
root=..
rm -rf corpus
mkdir -p corpus/{safetensors,checkpoint_config,catalogue,waivers,report_files,op_params}
for f in "$root"/golden/ops/*.safetensors; do
    [ "$(stat -c %s "$f")" -le 1000000 ] && cp "$f" corpus/safetensors/
done
cp "$root"/golden/model/config.json corpus/checkpoint_config/ 2>/dev/null || true
i=0
for f in "$root"/conformance/cases/*.yaml; do
    # The first byte picks the family; any byte works as a start.
    { printf "\\x$(printf %02x "$i")"; cat "$f"; } > "corpus/catalogue/$(basename "$f")"
    i=$((i + 1))
done
cp "$root"/conformance/waivers.yaml corpus/waivers/
printf '%s\n' '{"id":"add(rows=1)","backend":"cpu","device":"d","driver":"v","outcome":"Fail","metric":"out.elementwise","value":"NaN","threshold":"inf","worst_index":[3,17],"seed":42,"duration_s":0.25,"message":"m","waiver":null}' > corpus/report_files/results.jsonl
printf 'out_dtype=bf16\nscale_fmt=float\n' > corpus/op_params/params
