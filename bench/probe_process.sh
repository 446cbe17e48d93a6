#!/usr/bin/env bash
# Where the whole Wanda + DLP process goes at LLaMA-2-7B dims (fp16, 32 blocks, the released-code comparison's
# command): RUNS timed runs (1), one under `-X importtime` and one under cProfile (main thread; IMPORTTIME= and
# PROFILE= leave them out; EXTRA=--no-cache recomputes the statistics each run). Writes OUTDIR/*.
#   bash bench/probe_process.sh OUTDIR [MODEL_DIR]        (needs LAYERPRUNE_DATA and .stage/smoltok)
set -u
out=$1; mdir=${2:-/dev/shm/m7b}
mkdir -p "$out"
[ -f "$mdir/config.json" ] || python3 bench/released_dlp.py --make-model llama2-7b --blocks 32 --tokenizer .stage/smoltok \
  --model-dir "$mdir" --device cuda > "$out/make_model.log" 2>&1 || { tail -5 "$out/make_model.log"; exit 1; }
cmd=(-m layerprune.cli prune "$mdir" --pruner wanda --allocation dlp --sparsity 0.5 --nsamples 128 --seqlen 2048
     --dtype float16 --device cuda --eval wikitext2 --json --quiet --alpha 0.15 --stat mean ${EXTRA:-})
for i in $(seq "${RUNS:-1}"); do
  t0=$(date +%s.%N); python3 "${cmd[@]}" > "$out/run$i.json" 2> "$out/run$i.err"; t1=$(date +%s.%N)
  echo "run $i exit $? wall $(python3 -c "print(round($t1 - $t0, 2))") s"
done
[ -n "${IMPORTTIME-1}" ] && python3 -X importtime "${cmd[@]}" > "$out/importtime.json" 2> "$out/importtime.txt"
[ -n "${PROFILE-1}" ] && LAYERPRUNE_NORMAL_EXIT=1 python3 -m cProfile -o "$out/run.prof" "${cmd[@]}" > "$out/profiled.json" 2> "$out/profiled.err"
python3 - "$out" <<'PY'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/run*.json")) + [sys.argv[1] + "/profiled.json"]:
    try:
        s = open(f).read(); r = json.loads(s[s.index("{"):])
    except Exception as e:
        print(f, "unreadable", e); continue
    t = r.get("timing", {})
    print(f, {k: round(v, 2) for k, v in t.items() if isinstance(v, float)})
    def walk(d, path=""):
        for k, v in d.items():
            if isinstance(v, dict):
                if k.endswith("split"):
                    print("  ", path + k, {a: round(b, 2) if isinstance(b, float) else b for a, b in v.items()})
                walk(v, path + k + ".")
    walk(r)
PY
