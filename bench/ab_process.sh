#!/usr/bin/env bash
# Whole-process time of the released-code comparison's layerprune command (Wanda + DLP 50%, --stat mean, fp16,
# 128 x 2048, WikiText-2), this tree (A) against an older one (B, a folder holding its `layerprune` package, e.g.
# `git archive OLD layerprune | tar -x -C .stage/old`), alternating B, A, B, A, ... in one session; each run
# recomputes its statistics (an empty LAYERPRUNE_CACHE). With RELEASED=1 the released DLP code (.stage/DLP) runs
# first on the same folder. Writes OUTDIR/ab.json (the runs' records and shell wall times; the per-run files beside
# it are what it was made from).
#   bash bench/ab_process.sh OUTDIR OLD_TREE [MODEL_DIR] [PAIRS]   (needs LAYERPRUNE_DATA and .stage/smoltok)
# A smoke test on the CPU: DEVICE=cpu NSAMPLES=2 SEQLEN=64 EXTRA="--eval-max-windows 1" and a small model folder.
set -u
out=$1; old=$2; mdir=${3:-/dev/shm/m7b}; pairs=${4:-2}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out"
[ -f "$mdir/config.json" ] || python3 bench/released_dlp.py --make-model llama2-7b --blocks 32 --tokenizer .stage/smoltok \
  --model-dir "$mdir" --device cuda > "$out/make_model.log" 2>&1 || { tail -5 "$out/make_model.log"; exit 1; }
if [ -n "${RELEASED:-}" ]; then
  t0=$(date +%s.%N)
  python3 bench/released_dlp.py --side released --method wanda_dlp --model-dir "$mdir" --dlp-repo .stage/DLP \
    --device cuda --out "$out/released.json" > "$out/released.log" 2>&1
  echo "released exit $? wall $(python3 -c "print(round($(date +%s.%N) - $t0, 2))") s" | tee "$out/released_wall.txt"
fi
# shellcheck disable=SC2206
args=(prune "$mdir" --pruner wanda --allocation dlp --sparsity 0.5 --nsamples "${NSAMPLES:-128}" --seqlen "${SEQLEN:-2048}"
      --dtype float16 --device "${DEVICE:-cuda}" --eval wikitext2 --json --quiet --alpha 0.15 --stat mean ${EXTRA:-})
here=$PWD
for i in $(seq "$pairs"); do
  for side in B A; do
    tree=$here; [ $side = B ] && tree=$(cd "$old" && pwd)
    cache=$(mktemp -d)
    t0=$(date +%s.%N)
    (cd "$tree" && LAYERPRUNE_CACHE=$cache PYTHONPATH=$tree python3 -m layerprune.cli "${args[@]}" > "$out/$side$i.json" 2> "$out/$side$i.err")
    rc=$?; t1=$(date +%s.%N)
    echo "$side$i exit $rc wall $(python3 -c "print(round($t1 - $t0, 2))") s" | tee -a "$out/walls.txt"
    rm -rf "$cache"
  done
done
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
runs = []
for line in (d / "walls.txt").read_text().splitlines():
    name, _, rc, _, wall, _ = line.split()
    row = {"run": name, "exit": int(rc), "wall_s": float(wall)}
    try:
        s = (d / f"{name}.json").read_text(); rec = json.loads(s[s.index("{"):])
        row["timing"] = rec.get("timing")
        row["dense_stats_split"] = (rec.get("allocation") or {}).get("diagnostics", {}).get("dense_stats_split")
        row["ppl_wikitext2"] = rec["ppl"]["wikitext2"]
        row["per_block"] = rec["per_block"]
    except Exception as e:  # noqa: BLE001
        row["error"] = str(e)
    runs.append(row)
rel = d / "released.json"
res = {"runs": runs, "released": json.loads(rel.read_text()) if rel.is_file() else None}
if (d / "released_wall.txt").is_file():  # "released exit RC wall S s"
    w = (d / "released_wall.txt").read_text().split()
    res["released_exit"], res["released_wall_s"] = int(w[2]), float(w[4])
(d / "ab.json").write_text(json.dumps(res, indent=1))
for r in runs:
    t = r.get("timing") or {}
    print(r["run"], r["wall_s"], {k: round(t[k], 2) for k in ("startup_seconds", "load_import_seconds", "load_weights_seconds",
          "allocation_seconds", "prune_seconds", "eval_seconds") if isinstance(t.get(k), float)},
          "block0", ((r.get("dense_stats_split") or {}).get("per_block_s") or [None])[0], "ppl", r.get("ppl_wikitext2"))
PY
