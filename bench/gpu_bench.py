"""GPU benchmarks for BENCHMARKS.md (run on the device machine; BENCHMARKS.md has the set-up commands).

    python bench/gpu_bench.py --model smollm2-135m --part 4 --out $OUT/part4.json

Parts: 3 dense ppl · 4 pruners × patterns · 5 allocators at 70% (14 = the same for another model) ·
6 SWSV vs exact Shapley (12 = w 4-6 against stored exact) · 7 DLP sparsities / α / granularity / mixed N:M ·
8 batching and bf16 vs the batch-1 loop · 9, 10, 15, 16 SV-NUP game variants × base pruners ·
11 capped memory + SV-NUP with 16 windows · 13 full-size zero-shot.
Each part appends records to its JSON file as runs finish, so a timed-out call still returns data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layerprune.api import Session, prune
from layerprune.evaluation.perplexity import evaluate_ppl
from layerprune.models.loading import load_model
from layerprune.utils import setup_logging

RESULTS: list[dict] = []
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save(path: str) -> None:
    Path(path).write_text(json.dumps(RESULTS, indent=1, default=str))


def slim(rec: dict) -> dict:
    keep = ["config", "sparsity", "per_block", "per_block_achieved", "ppl", "timing", "peak_mem_mb", "dense_ppl"]
    out = {k: rec.get(k) for k in keep}
    d = rec.get("allocation", {}).get("diagnostics", {})
    out["diagnostics"] = {k: v for k, v in d.items() if k in ("phi", "evaluations", "sv_seconds", "evals_per_second",
                                                              "setup_seconds", "statistic", "S", "lod_percent", "alpha", "seconds")}
    return out


def guarded(label: str, out: str, fn) -> dict:
    """Run one benchmark record: a failure is logged and recorded, never fatal; results are saved at once."""
    try:
        r = {"label": label, **fn()}
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        r = {"label": label, "error": repr(e)}
    RESULTS.append(r)
    save(out)
    return r


def run(model_spec: str, out: str, label: str, **kw) -> dict:
    def one() -> dict:
        t = time.perf_counter()
        model, tok = load_model(model_spec, dtype=kw.pop("dtype", "float32"))
        sess = Session(model, tok, DEV, kw.pop("calib", "c4"), nsamples=kw.pop("nsamples", 128),
                       seqlen=kw.pop("seqlen", 2048), batch_size=kw.pop("batch_size", 8),
                       offload=kw.pop("offload", "auto"), progress=False, use_cache=True)
        rec = prune(model, session=sess, progress=False, **kw)
        return {**slim(rec), "wall_seconds": time.perf_counter() - t}

    r = guarded(label, out, one)
    ppl = r.get("ppl", {})
    print(f"## {label}: " + ", ".join(f"{k}={v:.3f}" for k, v in ppl.items()) +
          f" | {r.get('wall_seconds', 0):.1f}s | peak {r.get('peak_mem_mb')}", flush=True)
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    return r


def part3(m: str, out: str) -> None:
    model, tok = load_model(m)
    dev = DEV
    for seqlen, mw in ((512, 8), (2048, None)):
        t = time.perf_counter()
        r = evaluate_ppl(model, tok, ["wikitext2"], seqlen, mw, dev)
        RESULTS.append({"label": f"dense wikitext2 seqlen {seqlen} windows {mw or 'all'}", "ppl": r["wikitext2"],
                        "seconds": time.perf_counter() - t})
        print("##", RESULTS[-1], flush=True)
    r = evaluate_ppl(model, tok, ["c4", "ptb"], 2048, None, dev)
    RESULTS.append({"label": "dense c4/ptb seqlen 2048", "ppl": r})
    save(out)


def part4(m: str, out: str) -> None:
    ev = {"eval": ["wikitext2"], "eval_seqlen": 2048}
    for pruner in ("magnitude", "wanda", "sparsegpt"):
        for pat, sp in (("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None)):
            run(m, out, f"{pruner} {pat} {sp or ''}", sparsity=sp, pruner=pruner, pattern=pat, **ev)


# the allocation table's columns, by the names --allocs takes
ALLOCS = {"uniform": ("uniform", {}), "owl": ("owl", {}), "alphapruning": ("alphapruning", {}),
          "dlp-median": ("dlp", {"stat": "median"}), "dlp-mean": ("dlp", {"stat": "mean"})}


def part5(m: str, out: str, pruners: tuple[str, ...] = ("wanda", "sparsegpt"),
          allocs: tuple[tuple[str, dict], ...] = tuple(ALLOCS.values()), sparsity: float = 0.7,
          evals: tuple[str, ...] = ("wikitext2", "c4")) -> None:
    """The allocation table at 70%: each base pruner × uniform / OWL / AlphaPruning / DLP (median, mean).
    Part 14 is the same table for another model (gemma3-270m), one pruner per call if needed."""
    ev = {"eval": list(evals), "eval_seqlen": 2048}
    for pruner in pruners:
        for alloc, opts in allocs:
            run(m, out, f"{pruner} {alloc} {opts} {sparsity}", sparsity=sparsity, pruner=pruner, allocation=alloc,
                alloc_options=opts, **ev)


def part7(m: str, out: str) -> None:
    ev = {"eval": ["wikitext2", "c4"], "eval_seqlen": 2048}
    for sp in (0.5, 0.6, 0.8):
        run(m, out, f"wanda uniform {sp}", sparsity=sp, pruner="wanda", **ev)
        run(m, out, f"wanda dlp {sp}", sparsity=sp, pruner="wanda", allocation="dlp", **ev)
    for a in (0.05, 0.10, 0.20, 0.25):
        run(m, out, f"wanda dlp alpha={a} 0.7", sparsity=0.7, pruner="wanda", allocation="dlp",
            alloc_options={"alpha": a}, **ev)
    run(m, out, "wanda dlp granularity=linear 0.7", sparsity=0.7, pruner="wanda", allocation="dlp",
        alloc_options={"granularity": "linear"}, **ev)
    run(m, out, "wanda dlp 2:4 (mixed N:M)", pruner="wanda", pattern="2:4", allocation="dlp", **ev)
    run(m, out, "wanda owl 2:4 (mixed N:M)", pruner="wanda", pattern="2:4", allocation="owl", **ev)


def _masks(model) -> dict[str, torch.Tensor]:
    from layerprune.models.adapter import ModelAdapter
    ad = ModelAdapter.of(model)
    return {ad.full_name(i, n): (lin.weight.data == 0).cpu() for i, n, lin in ad.all_linears()}


def part8(m: str, out: str, nsamples: int = 128, seqlen: int = 2048) -> None:
    """Batching and precision: batch 1 has the reference loop's structure (one calibration sequence per
    block forward, two forwards per block); the masks of every run are compared with the batch-1 run."""
    for pruner in ("wanda", "sparsegpt"):
        ref: dict = {}
        for bs, dtype in ((1, "float32"), (8, "float32"), (32, "float32"), (1, "bfloat16"), (8, "bfloat16")):
            def one(bs: int = bs, dtype: str = dtype) -> dict:
                model, tok = load_model(m, dtype=dtype)
                sess = Session(model, tok, DEV, "c4", nsamples=nsamples, seqlen=seqlen, seed=0, batch_size=bs, offload="device", progress=False)
                rec = prune(model, session=sess, progress=False, sparsity=0.5, pruner=pruner, eval=["wikitext2"],
                            eval_seqlen=seqlen)
                masks = _masks(model)
                r = slim(rec)
                if not ref:
                    ref.update(masks)
                else:
                    same = sum(int((masks[k] == ref[k]).sum()) for k in ref)
                    r["mask_agreement_vs_batch1_fp32"] = same / sum(v.numel() for v in ref.values())
                return r

            label = f"{pruner} 0.5 batch_size={bs} {dtype}"
            r = guarded(label, out, one)
            print("##", label, r.get("timing", {}).get("prune_seconds"), r.get("ppl"),
                  r.get("mask_agreement_vs_batch1_fp32"), r.get("peak_mem_mb"), flush=True)


def part6(m: str, out: str, windows: tuple[int, ...] = (2, 3, 4, 5, 6), stored_exact: bool = False) -> None:
    """SWSV vs exact Shapley over 8 player blocks (11-18), SparseGPT 70% copies, D/P game, dense background.
    Part 12 = windows 4-6 against the exact values part 6 stored (w = 4 recomputed as a determinism check)."""
    import numpy as np

    from layerprune.allocation.shapley import spearman
    from layerprune.allocation.svnup import SVGame

    model, tok = load_model(m)
    dev = DEV
    sess = Session(model, tok, dev, nsamples=128, seqlen=2048, progress=False)
    t = time.perf_counter()
    game = SVGame(model, sess.adapter, sess.sv_ids(32), sess.calib().input_ids, 0.7, "sparsegpt", dev,
                  background="dense", progress=False)
    players = list(range(11, 19))
    rows: dict = {"label": "SWSV vs exact over blocks 11-18 (sparsegpt 0.7, D/P, dense background)",
                  "setup_seconds": time.perf_counter() - t, "windows": {}}
    prev = None
    if stored_exact:
        prev = json.loads((Path(__file__).parent / "results" / "smollm2_part6_swsv_vs_exact.json").read_text())[0]
        exact = np.array(prev["exact"])
    else:
        t = time.perf_counter()
        exact, ne = game.reference(players, "exact", progress=False)
        rows.update(exact=exact.tolist(), exact_evals=ne, exact_seconds=time.perf_counter() - t)
    RESULTS.append(rows)
    for w in windows:
        t = time.perf_counter()
        phi, n = game.swsv(players, w, progress=False)
        rows["windows"][w] = {"phi": phi.tolist(), "evals": n, "seconds": time.perf_counter() - t,
                              "spearman": spearman(phi, exact)}
        if prev is not None and str(w) in prev["windows"]:
            rows[f"w{w}_max_abs_diff_vs_part6"] = float(np.abs(phi - np.array(prev["windows"][str(w)]["phi"])).max())
        print("## w", w, rows["windows"][w]["spearman"], n, rows["windows"][w]["seconds"], flush=True)
        save(out)
    game.close()


def part11(m: str, out: str) -> None:
    model_bytes = 134_515_008 * 4
    total = torch.cuda.get_device_properties(0).total_memory
    frac = 0.9 * model_bytes / total
    torch.cuda.set_per_process_memory_fraction(frac)
    run(m, out, f"sparsegpt 0.5 capped at {frac * total / 2**20:.0f} MiB (model {model_bytes / 2**20:.0f} MiB)",
        sparsity=0.5, pruner="sparsegpt", eval=[], offload="cpu", batch_size=2)
    torch.cuda.set_per_process_memory_fraction(1.0)
    run(m, out, "sparsegpt 0.5 uncapped, offload=cpu, batch 2 (same masks expected)", sparsity=0.5,
        pruner="sparsegpt", eval=["wikitext2"], eval_seqlen=2048, offload="cpu", batch_size=2)
    run(m, out, "sparsegpt svnup sv_samples=16 0.7", sparsity=0.7, pruner="sparsegpt", allocation="svnup",
        alloc_options={"sv_samples": 16, "background": "dense"}, eval=["wikitext2", "c4"], eval_seqlen=2048)


def part13(m: str, out: str) -> None:
    """Zero-shot, the eight tasks at full size: dense vs 70% Wanda uniform vs 70% Wanda+DLP."""
    from layerprune.evaluation.zeroshot import zero_shot

    tasks = ["arc_easy", "arc_challenge", "boolq", "piqa", "winogrande", "openbookqa", "hellaswag", "rte"]
    for label, alloc in (("dense", None), ("wanda 0.7 uniform", "uniform"), ("wanda 0.7 dlp", "dlp")):
        def one(alloc: str | None = alloc) -> dict:
            t = time.perf_counter()
            model, tok = load_model(m)
            r: dict = {}
            if alloc is not None:
                sess = Session(model, tok, DEV, progress=False)
                r.update(slim(prune(model, session=sess, progress=False, sparsity=0.7, pruner="wanda",
                                    allocation=alloc, eval=["wikitext2"], eval_seqlen=2048)))
            t0 = time.perf_counter()
            r["zero_shot"] = zero_shot(model, tok, tasks, limit=None, batch_size=64, device=DEV)
            r["zero_shot_seconds"] = time.perf_counter() - t0
            r["wall_seconds"] = time.perf_counter() - t
            return r

        r = guarded(label, out, one)
        zs = r.get("zero_shot", {})
        print("##", label, {k: round(v["acc"], 4) for k, v in zs.get("tasks", {}).items()},
              zs.get("average", {}).get("acc"), r.get("zero_shot_seconds"), flush=True)


SV_GAMES = (("pruned", "pruned"), ("pruned", "dense"), ("removed", "dense"))  # (absent, background); default first


def part15(m: str, out: str, pruners: tuple[str, ...] = ("sparsegpt", "wanda"),
           games: tuple[tuple[str, str], ...] = SV_GAMES, sparsity: float = 0.7) -> None:
    """SV-NUP at 70% (``--sparsity``): every game variant on each base pruner (part 16 = the smollm2 Wanda
    variants not yet run)."""
    ev = {"eval": ["wikitext2", "c4"], "eval_seqlen": 2048}
    for pruner in pruners:
        for absent, bg in games:
            run(m, out, f"{pruner} svnup absent={absent} background={bg} {sparsity}", sparsity=sparsity, pruner=pruner,
                allocation="svnup", alloc_options={"absent": absent, "background": bg}, **ev)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--part", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pruners", default=None, help="parts 5/14/15: comma-separated base pruners")
    ap.add_argument("--allocs", default=None, help="parts 5/14: subset of the table, e.g. alphapruning,dlp-mean")
    ap.add_argument("--eval", default="wikitext2,c4", help="parts 5/14: perplexity datasets")
    ap.add_argument("--sparsity", type=float, default=0.7, help="parts 5/14/15: target sparsity")
    ap.add_argument("--games", default=None, help="part 15: subset of the games as absent:background, e.g. "
                                                  "pruned:pruned,removed:dense")
    a = ap.parse_args()
    setup_logging("WARNING")
    print(torch.__version__, torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu", flush=True)
    prs = tuple(a.pruners.split(",")) if a.pruners else None
    allocs = tuple(ALLOCS[x] for x in (a.allocs.split(",") if a.allocs else ALLOCS))
    games = tuple(tuple(g.split(":")) for g in a.games.split(",")) if a.games else SV_GAMES
    if a.part in (5, 14):
        part5(a.model, a.out, prs or ("wanda", "sparsegpt"), allocs, a.sparsity, tuple(a.eval.split(",")))
    elif a.part == 15:
        part15(a.model, a.out, prs or ("sparsegpt", "wanda"), games, a.sparsity)
    elif a.part == 9:  # the two non-default games on SparseGPT
        part15(a.model, a.out, ("sparsegpt",), (("removed", "dense"), ("pruned", "pruned")))
    elif a.part == 10:  # D/P with dense background on both bases
        part15(a.model, a.out, ("sparsegpt", "wanda"), (("pruned", "dense"),))
    elif a.part == 12:
        part6(a.model, a.out, (4, 5, 6), stored_exact=True)
    elif a.part == 16:
        part15(a.model, a.out, ("wanda",), SV_GAMES[:1] + SV_GAMES[2:])
    else:
        {3: part3, 4: part4, 6: part6, 7: part7, 8: part8, 11: part11, 13: part13}[a.part](a.model, a.out)
    save(a.out)
