"""GPU benchmarks for BENCHMARKS.md (run on the device machine; see bench/README.md).

    python bench/gpu_bench.py --model smollm2-135m --part 4 --out $OUT/part4.json

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

from layerprune.api import Session, evaluate_ppl, prune
from layerprune.models.loading import load_model
from layerprune.utils import setup_logging

RESULTS: list[dict] = []


def save(path: str) -> None:
    Path(path).write_text(json.dumps(RESULTS, indent=1, default=str))


def slim(rec: dict) -> dict:
    keep = ["config", "sparsity", "per_block", "per_block_achieved", "ppl", "timing", "peak_mem_mb", "dense_ppl"]
    out = {k: rec.get(k) for k in keep}
    d = rec.get("allocation", {}).get("diagnostics", {})
    out["diagnostics"] = {k: v for k, v in d.items() if k in ("phi", "evaluations", "sv_seconds", "evals_per_second",
                                                              "setup_seconds", "statistic", "S", "lod_percent", "alpha", "seconds")}
    return out


def run(model_spec: str, out: str, label: str, **kw) -> dict | None:
    t = time.perf_counter()
    try:
        model, tok = load_model(model_spec, dtype=kw.pop("dtype", "float32"))
        dev = torch.device("cuda")
        sess = Session(model, tok, dev, kw.pop("calib", "c4"), kw.pop("nsamples", 128), kw.pop("seqlen", 2048),
                       0, kw.pop("batch_size", 8), kw.pop("offload", "auto"), progress=False, use_cache=True)
        rec = prune(model, session=sess, progress=False, **kw)
        r = {"label": label, **slim(rec), "wall_seconds": time.perf_counter() - t}
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        r = {"label": label, "error": repr(e)}
    RESULTS.append(r)
    save(out)
    ppl = r.get("ppl", {})
    print(f"## {label}: " + ", ".join(f"{k}={v:.3f}" for k, v in ppl.items()) +
          f" | {r.get('wall_seconds', 0):.1f}s | peak {r.get('peak_mem_mb')}", flush=True)
    torch.cuda.empty_cache()
    return r


def part3(m: str, out: str) -> None:
    model, tok = load_model(m)
    dev = torch.device("cuda")
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


def part5(m: str, out: str) -> None:
    ev = {"eval": ["wikitext2", "c4"], "eval_seqlen": 2048}
    for pruner in ("wanda", "sparsegpt"):
        for alloc, opts in (("uniform", {}), ("owl", {}), ("alphapruning", {}), ("dlp", {"stat": "median"}),
                            ("dlp", {"stat": "mean"})):
            run(m, out, f"{pruner} {alloc} {opts} 0.7", sparsity=0.7, pruner=pruner, allocation=alloc,
                alloc_options=opts, **ev)


def part9(m: str, out: str) -> None:
    ev = {"eval": ["wikitext2", "c4"], "eval_seqlen": 2048}
    for pruner in ("sparsegpt",):
        for absent, bg in (("removed", "dense"), ("pruned", "pruned")):
            run(m, out, f"{pruner} svnup absent={absent} background={bg} 0.7", sparsity=0.7, pruner=pruner,
                allocation="svnup", alloc_options={"absent": absent, "background": bg}, **ev)


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


def part8(m: str, out: str) -> None:
    """Batching and precision: batch 1 has the reference loop's structure (one calibration sequence per
    block forward, two forwards per block); the masks of every run are compared with the batch-1 run."""
    dev = torch.device("cuda")
    for pruner in ("wanda", "sparsegpt"):
        ref = None
        for bs, dtype in ((1, "float32"), (8, "float32"), (32, "float32"), (1, "bfloat16"), (8, "bfloat16")):
            label = f"{pruner} 0.5 batch_size={bs} {dtype}"
            try:
                model, tok = load_model(m, dtype=dtype)
                sess = Session(model, tok, dev, "c4", 128, 2048, 0, bs, "gpu", progress=False, use_cache=True)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                rec = prune(model, session=sess, progress=False, sparsity=0.5, pruner=pruner, eval=["wikitext2"],
                            eval_seqlen=2048)
                masks = _masks(model)
                r = {"label": label, **slim(rec)}
                if ref is None:
                    ref = masks
                else:
                    same = sum(int((masks[k] == ref[k]).sum()) for k in ref)
                    tot = sum(ref[k].numel() for k in ref)
                    r["mask_agreement_vs_batch1_fp32"] = same / tot
                del model, sess
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                r = {"label": label, "error": repr(e)}
            RESULTS.append(r)
            save(out)
            print("##", label, r.get("timing", {}).get("prune_seconds"), r.get("ppl"),
                  r.get("mask_agreement_vs_batch1_fp32"), r.get("peak_mem_mb"), flush=True)
            torch.cuda.empty_cache()


def part12(m: str, out: str) -> None:
    """SWSV w = 4 (check against part 6), 5, 6 against part 6's stored exact Shapley values."""
    import numpy as np

    from layerprune.allocation.shapley import spearman
    from layerprune.allocation.svnup import SVGame

    prev = json.loads((Path(__file__).parent / "results" / "smollm2_part6_swsv_vs_exact.json").read_text())[0]
    exact = np.array(prev["exact"])
    model, tok = load_model(m)
    dev = torch.device("cuda")
    sess = Session(model, tok, dev, nsamples=128, seqlen=2048, progress=False)
    t = time.perf_counter()
    game = SVGame(model, sess.adapter, sess.sv_ids(32), sess.calib().input_ids, 0.7, "sparsegpt", dev, background="dense",
                  progress=False)
    rows = {"label": "SWSV w=4..6 vs part-6 exact over blocks 11-18", "setup_seconds": time.perf_counter() - t,
            "windows": {}}
    RESULTS.append(rows)
    players = list(range(11, 19))
    for w in (4, 5, 6):
        t = time.perf_counter()
        phi, n = game.swsv(players, w, progress=False)
        rows["windows"][w] = {"phi": phi.tolist(), "evals": n, "seconds": time.perf_counter() - t,
                              "spearman": spearman(phi, exact)}
        if w == 4:
            rows["w4_max_abs_diff_vs_part6"] = float(np.abs(phi - np.array(prev["windows"]["4"]["phi"])).max())
        print("## w", w, rows["windows"][w]["spearman"], n, rows["windows"][w]["seconds"], flush=True)
        save(out)
    game.close()


def part6(m: str, out: str) -> None:
    from layerprune.allocation.shapley import spearman
    from layerprune.allocation.svnup import SVGame

    # SWSV vs exact Shapley over 8 player blocks
    model, tok = load_model(m)
    dev = torch.device("cuda")
    sess = Session(model, tok, dev, nsamples=128, seqlen=2048, progress=False)
    t = time.perf_counter()
    game = SVGame(model, sess.adapter, sess.sv_ids(32), sess.calib().input_ids, 0.7, "sparsegpt", dev, background="dense",
                  progress=False)
    setup = time.perf_counter() - t
    players = list(range(11, 19))
    t = time.perf_counter()
    exact, ne = game.reference(players, "exact", progress=False)
    t_exact = time.perf_counter() - t
    rows = {"label": "SWSV vs exact over blocks 11-18 (sparsegpt 0.7, D/P, dense background)", "exact": exact.tolist(),
            "exact_evals": ne, "exact_seconds": t_exact, "setup_seconds": setup, "windows": {}}
    for w in range(2, 7):
        t = time.perf_counter()
        phi, n = game.swsv(players, w, progress=False)
        rows["windows"][w] = {"phi": phi.tolist(), "evals": n, "seconds": time.perf_counter() - t,
                              "spearman": spearman(phi, exact)}
        print("## w", w, rows["windows"][w]["spearman"], n, flush=True)
        if w == 2:
            RESULTS.append(rows)
        save(out)
    game.close()
    save(out)


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


def part10(m: str, out: str) -> None:
    ev = {"eval": ["wikitext2", "c4"], "eval_seqlen": 2048}
    for pruner in ("sparsegpt", "wanda"):
        for absent, bg in (("pruned", "dense"),):
            run(m, out, f"{pruner} svnup absent={absent} background={bg} 0.7", sparsity=0.7, pruner=pruner,
                allocation="svnup", alloc_options={"absent": absent, "background": bg}, **ev)


def part13(m: str, out: str) -> None:
    """Zero-shot, the eight tasks at full size: dense vs 70% Wanda uniform vs 70% Wanda+DLP."""
    from layerprune.evaluation.zeroshot import zero_shot

    tasks = ["arc_easy", "arc_challenge", "boolq", "piqa", "winogrande", "openbookqa", "hellaswag", "rte"]
    dev = torch.device("cuda")
    for label, alloc in (("dense", None), ("wanda 0.7 uniform", "uniform"), ("wanda 0.7 dlp", "dlp")):
        t = time.perf_counter()
        try:
            model, tok = load_model(m)
            r: dict = {"label": label}
            if alloc is not None:
                sess = Session(model, tok, dev, progress=False)
                rec = prune(model, session=sess, progress=False, sparsity=0.7, pruner="wanda", allocation=alloc,
                            eval=["wikitext2"], eval_seqlen=2048)
                r.update(slim(rec))
            t0 = time.perf_counter()
            r["zero_shot"] = zero_shot(model, tok, tasks, limit=None, batch_size=64, device=dev)
            r["zero_shot_seconds"] = time.perf_counter() - t0
            r["wall_seconds"] = time.perf_counter() - t
            del model
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            r = {"label": label, "error": repr(e)}
        RESULTS.append(r)
        save(out)
        zs = r.get("zero_shot", {})
        print("##", label, {k: round(v["acc"], 4) for k, v in zs.get("tasks", {}).items()},
              zs.get("average", {}).get("acc"), r.get("zero_shot_seconds"), flush=True)
        torch.cuda.empty_cache()


def part14(m: str, out: str, pruners: tuple[str, ...] = ("wanda", "sparsegpt")) -> None:
    """Part 5's allocation table for another model (gemma3-270m), one pruner per call if needed."""
    ev = {"eval": ["wikitext2", "c4"], "eval_seqlen": 2048}
    for pruner in pruners:
        for alloc, opts in (("uniform", {}), ("owl", {}), ("alphapruning", {}), ("dlp", {"stat": "median"}),
                            ("dlp", {"stat": "mean"})):
            run(m, out, f"{pruner} {alloc} {opts} 0.7", sparsity=0.7, pruner=pruner, allocation=alloc,
                alloc_options=opts, **ev)


def part15(m: str, out: str) -> None:
    """SV-NUP (default game) on another model, both bases."""
    ev = {"eval": ["wikitext2", "c4"], "eval_seqlen": 2048}
    for pruner in ("sparsegpt", "wanda"):
        run(m, out, f"{pruner} svnup 0.7", sparsity=0.7, pruner=pruner, allocation="svnup", **ev)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--part", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pruners", default="wanda,sparsegpt", help="part 14 only")
    a = ap.parse_args()
    setup_logging("WARNING")
    os.environ["LAYERPRUNE_PROGRESS"] = "0"
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    fn = {3: part3, 4: part4, 5: part5, 6: part6, 7: part7, 8: part8, 9: part9, 10: part10, 11: part11, 12: part12,
          13: part13, 15: part15}.get(a.part)
    if a.part == 14:
        part14(a.model, a.out, tuple(a.pruners.split(",")))
    else:
        fn(a.model, a.out)
    save(a.out)
