#!/usr/bin/env bash
# Lays out a seed corpus of real files of this tree under fuzz/corpus/<target>/
# (not committed: it is rebuilt from the tree each time).
set -euo pipefail
cd "$(dirname "$0")"
root=..
rm -rf corpus
mkdir -p corpus/{safetensors,checkpoint_config,catalogue,waivers,report_files,op_params,token_list,shard_index}
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
# token_list: the first byte picks inline ids (even) or a JSON file (odd).
printf '\x00%s' '0,1,2,3,127,255' > corpus/token_list/inline
{ printf '\x01'; cat "$root"/golden/model/tokens.json; } > corpus/token_list/golden-tokens.json
cat > corpus/shard_index/model.safetensors.index.json <<'JSON'
{"metadata": {"total_size": 123456, "format": "pt"},
 "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                "model.layers.0.self_attn.q_a_proj.weight": "model-00001-of-00002.safetensors",
                "model.layers.0.self_attn.q_a_proj.weight_scale_inv": "model-00002-of-00002.safetensors",
                "lm_head.weight": "model-00002-of-00002.safetensors"}}
JSON
