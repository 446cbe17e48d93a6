#!/usr/bin/env bash
# The real SmolLM2-135M through the user's commands on the GPU: prune (Wanda + DLP 70%, bf16) with --sparse-out
# (the delta layout), export the bitmask layout too, bench-decode both (dense-with-zeros twin vs sparse, CUDA
# graphs), and greedy generation of the pruned dense directory and of both sparse directories.
#   bash bench/sparse_smollm2_gpu.sh GGUF_OR_ALIAS RESULTS_DIR [WORK_DIR]
set -euo pipefail
S=$1; O=$2; W=${3:-/tmp/smol_sparse}
rm -rf "$W"; mkdir -p "$W" "$O"
lp() { python3 -m layerprune "$@"; }
lp prune "$S" --sparsity 0.7 --pruner wanda --allocation dlp --dtype bfloat16 --device cuda --eval wikitext2 \
   --eval-max-windows 8 --out "$W/p" --sparse-out "$W/sp" --json --quiet > "$O/smol_prune.json"
lp export "$W/p" --layout bitmask --out "$W/spb" --json --quiet > "$O/smol_export_bitmask.json"
lp bench-decode "$W/sp" --batch-sizes 1,4,16 --json --quiet > "$O/smol_decode_delta.json"
lp bench-decode "$W/spb" --batch-sizes 1,4,16 --json --quiet > "$O/smol_decode_bitmask.json"
for d in p sp spb; do
  lp generate "$W/$d" --max-new-tokens 24 --device cuda --dtype bfloat16 --json --quiet > "$O/smol_gen_$d.json"
done
python3 - "$O" <<'PY'
import json, sys
o = sys.argv[1]
g = {d: json.load(open(f"{o}/smol_gen_{d}.json"))["tokens"] for d in ("p", "sp", "spb")}
print("greedy tokens equal (delta, bitmask vs dense-with-zeros):", g["sp"] == g["p"], g["spb"] == g["p"])
for lay in ("delta", "bitmask"):
    r = json.load(open(f"{o}/smol_decode_{lay}.json"))
    print(lay, [(x["batch"], round(x["dense_tok_s"], 1), round(x["sparse_tok_s"], 1), round(x["speedup"], 3)) for x in r["rows"]],
          r["dense_weight_bytes"], r["sparse_weight_bytes"], r["mode"])
PY
