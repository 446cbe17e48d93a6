#!/usr/bin/env bash
# Whole-process wall time, the released DLP code vs layerprune, on one model folder (random weights with real
# dimensions, built here once), the same local data and settings; one process at a time, sides alternating.
#   bash bench/released_dlp.sh OUTDIR TOKENIZER_DIR DLP_REPO [BLOCKS] [METHODS]
#   bash bench/released_dlp.sh $OUT .stage/smoltok .stage/DLP 8 wanda_dlp,sparsegpt_dlp
# Needs LAYERPRUNE_DATA (the local C4 / WikiText-2 copies). Writes OUTDIR/released_dlp.json.
set -u
[ $# -ge 3 ] || { echo "usage: bash bench/released_dlp.sh OUTDIR TOKENIZER_DIR DLP_REPO [BLOCKS] [METHODS]" >&2; exit 2; }
out=$1; tok=$2; repo=$3; blocks=${4:-8}; methods=${5:-wanda_dlp,sparsegpt_dlp}
cd "$(dirname "$0")/.." || exit 2
mdir=${MODEL_DIR:-/tmp/released_dlp_llama2-7b_$blocks}
dev=${DEVICE:-cuda}; sides=${SIDES:-released layerprune}  # DEVICE=cpu SIDES=layerprune EXTRA=...: a smoke test
mkdir -p "$out"
[ -f "$mdir/config.json" ] || python3 bench/released_dlp.py --make-model llama2-7b --blocks "$blocks" --tokenizer "$tok" \
  --model-dir "$mdir" --device "$dev" > "$out/make_model.log" 2>&1 || { tail -5 "$out/make_model.log"; exit 1; }
rows=()
for m in ${methods//,/ }; do
  for side in $sides; do
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086
    python3 bench/released_dlp.py --side $side --method "$m" --model-dir "$mdir" --dlp-repo "$repo" --device "$dev" ${EXTRA:-} \
      --out "$out/$side.$m.json" > "$out/$side.$m.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    wall=$(python3 -c "print($t1 - $t0)")
    echo "$side $m exit $rc wall ${wall}s"
    rows+=("{\"side\": \"$side\", \"method\": \"$m\", \"exit\": $rc, \"wall_s\": $wall, \"blocks\": $blocks}")
  done
done
( IFS=,; echo "[${rows[*]}]" ) > "$out/released_dlp.json"
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1]); rows = json.loads((d / "released_dlp.json").read_text())
for r in rows:
    p = d / f"{r['side']}.{r['method']}.json"
    r["detail"] = json.loads(p.read_text()) if p.is_file() else None
for m in sorted({r["method"] for r in rows}):
    w = {r["side"]: r["wall_s"] for r in rows if r["method"] == m and r["exit"] == 0}
    if len(w) == 2:
        print(f"{m}: released {w['released']:.1f} s, layerprune {w['layerprune']:.1f} s, {w['released'] / w['layerprune']:.2f}x")
        lp = next(r for r in rows if r["method"] == m and r["side"] == "layerprune")
        own = (lp.get("detail") or {}).get("process_wall_s")
        if own:  # the layerprune CLI's own process (the wrapper above it imports torch for nothing on that side)
            print(f"{m}: layerprune CLI process alone {own:.1f} s, {w['released'] / own:.2f}x")
(d / "released_dlp.json").write_text(json.dumps(rows, indent=1))
PY
