"""Comparison grids: every (allocation, pruner, sparsity) on one model, resumable.

The model is loaded once; the calibration windows and the dense statistics pass are computed once
and shared; the dense weights are restored between runs. Each finished run is appended to
``results.json`` (atomically) and the grid is skipped where it already has a record, so an
interrupted grid resumes and finished results are never overwritten.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import time
from pathlib import Path

from layerprune.errors import UserError
from layerprune.utils import write_atomic

log = logging.getLogger("layerprune")


def run_key(allocation: str, pruner: str, sparsity: float | str, pattern: str) -> str:
    return f"{allocation}|{pruner}|{sparsity}|{pattern}"


def load_results(d: Path) -> dict:
    p = d / "results.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def write_tables(d: Path, res: dict) -> None:
    runs = res.get("runs", [])
    ppl_keys = sorted({k for r in runs for k in r.get("ppl", {})})
    task_keys = sorted({k for r in runs for k in r.get("tasks", {})})
    header = ["allocation", "pruner", "sparsity", "pattern", "achieved"] + [f"ppl_{k}" for k in ppl_keys] + \
             [f"{t}_acc" for t in task_keys] + (["zs_avg_acc"] if task_keys else []) + ["prune_seconds"]
    rows = []
    for r in runs:
        row = [r["allocation"], r["pruner"], r["sparsity"], r["pattern"], r.get("achieved")]
        row += [r.get("ppl", {}).get(k) for k in ppl_keys]
        row += [r.get("tasks", {}).get(t, {}).get("acc") for t in task_keys]
        if task_keys:
            row.append(r.get("zs_average"))
        row.append(r.get("prune_seconds"))
        rows.append(row)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    write_atomic(d / "results.csv", buf.getvalue())
    from layerprune.cli import table

    md = [f"# {res.get('model')} — comparison grid", "", table(header, rows), ""]
    write_atomic(d / "results.md", "\n".join(md))


def cmd_compare(a: argparse.Namespace) -> tuple[dict, str]:
    from layerprune.api import Session, _load, check_datasets, evaluate_ppl, parse_pattern, prune
    from layerprune.allocation import get_allocator
    from layerprune.cli import _csv, alloc_options
    from layerprune.pruners import get_pruner
    from layerprune.record import now, versions
    from layerprune.utils import resolve_device

    allocs, pruners = _csv(a.allocations), _csv(a.pruners)
    sps = [float(x) for x in _csv(a.sparsities)] if a.pattern == "unstructured" else [None]
    for x in allocs:
        get_allocator(x, a.pattern != "unstructured")
    for x in pruners:
        get_pruner(x)
    for s in sps:
        parse_pattern(a.pattern, s)
    ppl = check_datasets(_csv(a.ppl))
    tasks = _csv(a.tasks)
    if tasks:
        from layerprune.evaluation.zeroshot import check_tasks

        check_tasks(tasks)
    d = Path(a.out)
    if d.exists() and any(d.iterdir()) and not (d / "results.json").is_file():
        raise UserError(f"--out {d} exists and is not a layerprune results directory: choose another")
    d.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(a.device)
    model, tok, src = _load(a.model, None, a.dtype, dev, a.trust_remote_code)
    sess = Session(model, tok, dev, a.calib, a.nsamples, a.seqlen, a.seed, a.batch_size, a.offload, not a.quiet,
                   not a.no_cache)
    res = load_results(d)
    if res and res.get("weights") != sess.weights_hash():
        raise UserError(f"{d} holds results of a different model ({res.get('model')}): use a new --out directory")
    res.setdefault("model", src)
    res.setdefault("weights", sess.weights_hash())
    res.setdefault("created", now())
    res["versions"] = versions()
    res.setdefault("runs", [])
    res["settings"] = {"calib": a.calib, "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": a.seed,
                       "eval_seqlen": a.eval_seqlen or a.seqlen, "eval_max_windows": a.eval_max_windows,
                       "tasks": tasks, "limit": a.limit}
    done = {r["key"] for r in res["runs"]}
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def save() -> None:
        write_atomic(d / "results.json", json.dumps(res, indent=1, default=str))
        write_tables(d, res)

    if "dense" not in res:
        t = time.perf_counter()
        ev = evaluate_ppl(model, tok, ppl, a.eval_seqlen or a.seqlen, a.eval_max_windows, dev) if ppl else {}
        res["dense"] = {"ppl": {k: v["ppl"] for k, v in ev.items()}, "seconds": time.perf_counter() - t}
        if tasks:
            from layerprune.evaluation.zeroshot import zero_shot

            zs = zero_shot(model, tok, tasks, a.limit, device=dev)
            res["dense"]["tasks"], res["dense"]["zs_average"] = zs["tasks"], zs["average"]["acc"]
        model.to("cpu")
        save()
    skipped = 0
    for sp in sps:
        for pr in pruners:
            for al in allocs:
                key = run_key(al, pr, sp if sp is not None else a.pattern, a.pattern)
                if key in done:
                    skipped += 1
                    continue
                model.load_state_dict(dense)
                log.info("grid run %s", key)
                rec = prune(model, sp, pr, a.pattern, al, alloc_options(al, a), eval=ppl, eval_seqlen=a.eval_seqlen,
                            eval_max_windows=a.eval_max_windows, session=sess, progress=not a.quiet,
                            use_cache=not a.no_cache, tasks=tasks, limit=a.limit)
                run = {"key": key, "allocation": al, "pruner": pr, "sparsity": rec["sparsity"]["target"],
                       "pattern": a.pattern, "achieved": rec["sparsity"]["achieved"], "per_block": rec["per_block"],
                       "ppl": rec["ppl"], "prune_seconds": rec["timing"]["prune_seconds"],
                       "diagnostics": {k: v for k, v in rec["allocation"]["diagnostics"].items() if k != "alpha"}}
                if tasks:
                    run["tasks"], run["zs_average"] = rec["tasks"], rec["zero_shot"]["average"]["acc"]
                model.to("cpu")
                res["runs"].append(run)
                save()
    model.load_state_dict(dense)
    try:
        from layerprune.report import make_figures

        res["figures"] = make_figures(d, res)
        save()
    except ImportError:
        log.warning("matplotlib is not installed: no figures (pip install 'layerprune[plot]')")
    text = (d / "results.md").read_text() + f"\n{len(res['runs'])} runs in {d} ({skipped} already finished, skipped)"
    return {"out": str(d), "runs": len(res["runs"]), "skipped": skipped, "results": res["runs"], "dense": res["dense"]}, text
