"""Comparison grids: every (allocation, pruner, sparsity) on one model, resumable.

The model is loaded once; the calibration windows and the dense statistics pass are computed once
and shared; the dense weights are restored between runs. Each finished run is appended to
``results.json`` (atomically) under the hash of its full run configuration, and a cell is skipped
only when a run with exactly that configuration is there, so an interrupted grid resumes and a rerun
with other options adds new cells instead of relabelling old ones.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path
from typing import Callable

from layerprune.errors import UserError
from layerprune.utils import write_atomic

log = logging.getLogger("layerprune")


def run_key(allocation: str, pruner: str, sparsity: float | str, pattern: str) -> str:
    """The human label of a grid cell (the resume key is :func:`cell_hash`)."""
    return f"{allocation}|{pruner}|{sparsity}|{pattern}"


def cell_hash(config: dict) -> str:
    """Finished cells are keyed by the hash of their full run configuration (as RunDir keys a prune), so a
    rerun with another ``--alpha`` or ``--nsamples`` computes new cells instead of relabelling old ones."""
    from layerprune.record import args_hash

    return args_hash({k: v for k, v in config.items() if k not in ("world_size",)})


def load_results(d: Path) -> dict:
    p = d / "results.json"
    if not p.is_file():
        return {}
    try:
        res = json.loads(p.read_text())
    except ValueError:
        raise UserError(f"{p} is damaged (not valid JSON): remove it, or use a new --out directory") from None
    if not isinstance(res, dict) or not isinstance(res.get("runs", []), list):
        raise UserError(f"{p} is not a layerprune results file: use a new --out directory")
    return res


def table_rows(res: dict, dense_row: bool = True) -> tuple[list[str], list[list]]:
    """Header and rows of the grid table, the dense baseline first (``dense_row``)."""
    runs = res.get("runs", [])
    dense = res.get("dense") or {}
    ppl_keys = sorted({k for r in runs for k in r.get("ppl", {})} | set(dense.get("ppl", {})))
    task_keys = sorted({k for r in runs for k in r.get("tasks", {})})
    header = ["allocation", "pruner", "sparsity", "pattern", "achieved"] + [f"ppl_{k}" for k in ppl_keys] + \
             [f"{t}_acc" for t in task_keys] + (["zs_avg_acc"] if task_keys else []) + ["prune_seconds"]
    rows = []
    if dense and dense_row:
        row = ["dense", "-", 0.0, "-", 0.0] + [dense.get("ppl", {}).get(k) for k in ppl_keys]
        row += [dense.get("tasks", {}).get(t, {}).get("acc") for t in task_keys]
        rows.append(row + ([dense.get("zs_average")] if task_keys else []) + [None])
    for r in runs:
        row = [r["allocation"], r["pruner"], r["sparsity"], r["pattern"], r.get("achieved")]
        row += [r.get("ppl", {}).get(k) for k in ppl_keys]
        row += [r.get("tasks", {}).get(t, {}).get("acc") for t in task_keys]
        if task_keys:
            row.append(r.get("zs_average"))
        row.append(r.get("prune_seconds"))
        rows.append(row)
    return header, rows


def write_tables(d: Path, res: dict, render: Callable[[list[str], list[list]], str]) -> None:
    header, rows = table_rows(res, dense_row=False)  # the CSV: one row per run
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    write_atomic(d / "results.csv", buf.getvalue())
    header, rows = table_rows(res)  # the terminal / markdown table: the dense baseline first
    md = [f"# {res.get('model')} — comparison grid", "", render(header, rows), ""]
    write_atomic(d / "results.md", "\n".join(md))


def parse_sparsities(text: str, pattern: str) -> list[float | None]:
    if pattern != "unstructured":
        return [None]
    out = []
    for x in [t.strip() for t in text.split(",") if t.strip()]:
        try:
            out.append(float(x))
        except ValueError:
            raise UserError(f"--sparsities must be comma-separated numbers, e.g. 0.5,0.6,0.7 (got {x!r})") from None
    if not out:
        raise UserError("--sparsities is empty: give e.g. 0.5,0.6,0.7")
    return out


def run_grid(model: str, out: str | Path, allocations: list[str], pruners: list[str], sparsities: list[float | None],
             pattern: str = "unstructured", alloc_options: Callable[[str], dict] = lambda name: {},
             pruner_options: Callable[[str], dict] = lambda name: {}, calib=None, evaluation=None,
             device: str = "auto", dtype: str = "float32", trust_remote_code: bool = False, progress: bool = True,
             use_cache: bool = True, allow_long: bool = False, data_dir: str | None = None,
             render: Callable[[list[str], list[list]], str] | None = None) -> dict:
    """Run every (sparsity, pruner, allocation) cell not yet in ``out/results.json``; returns a summary."""
    from layerprune.api import EvalConfig, Session, calib_config, load, plan_prune, prune
    from layerprune.data.sources import data_dir as resolve_data_dir
    from layerprune.models.loading import check_model_spec
    from layerprune.record import now, versions
    from layerprune.utils import resolve_device

    render = render or (lambda h, r: "\n".join(",".join(map(str, x)) for x in [h, *r]))
    # ---- validate every cell before anything is loaded or created
    reqs = {(sp, pr, al): plan_prune(sp, pr, pattern, al, alloc_options(al), pruner_options(pr))
            for sp in sparsities for pr in pruners for al in allocations}
    cal = calib_config(calib)
    ev = (evaluation or EvalConfig()).validate()
    root = resolve_data_dir(data_dir)
    d = Path(out)
    if d.exists() and (not d.is_dir() or (any(d.iterdir()) and not (d / "results.json").is_file())):
        raise UserError(f"--out {d} exists and is not a layerprune results directory: choose another")
    res = load_results(d)
    check_model_spec(model)
    dev = resolve_device(device)
    mdl, tok, src = load(model, None, dtype, trust_remote_code)
    sess = Session(mdl, tok, dev, cal, progress=progress, use_cache=use_cache, data_dir=root)
    if res and res.get("weights") != sess.weights_hash():
        raise UserError(f"{d} holds results of a different model ({res.get('model')}): use a new --out directory")
    d.mkdir(parents=True, exist_ok=True)
    res.setdefault("model", src)
    res.setdefault("weights", sess.weights_hash())
    res.setdefault("created", now())
    res["versions"] = versions()
    res.setdefault("runs", [])
    res["settings"] = {**cal.key(), "eval_seqlen": ev.seqlen or cal.seqlen, "eval_max_windows": ev.max_windows,
                       "tasks": list(ev.tasks), "limit": ev.limit}
    done = {r.get("hash") for r in res["runs"]}
    dense = {k: v.detach().clone() for k, v in mdl.state_dict().items()}

    def save() -> None:
        write_atomic(d / "results.json", json.dumps(res, indent=1, default=str))
        write_tables(d, res, render)

    dense_key = {"eval": [list(ev.datasets), ev.seqlen or cal.seqlen, ev.max_windows, list(ev.tasks), ev.limit]}
    if res.get("dense", {}).get("key") != dense_key:
        t = time.perf_counter()
        ppl = sess.evaluate(ev) if ev.datasets else {}
        res["dense"] = {"ppl": {k: v["ppl"] for k, v in ppl.items()}, "seconds": time.perf_counter() - t,
                        "key": dense_key}
        if ev.tasks:
            from layerprune.evaluation.zeroshot import zero_shot

            zs = zero_shot(mdl, tok, list(ev.tasks), ev.limit, device=dev, data_dir=root)
            res["dense"]["tasks"], res["dense"]["zs_average"] = zs["tasks"], zs["average"]["acc"]
        mdl.to("cpu")
        save()
    skipped = 0
    for (sp, pr, al), req in reqs.items():
        config = {**req.config(src, cal, dtype), "eval": dense_key["eval"]}
        h = cell_hash(config)
        if h in done:
            skipped += 1
            continue
        key = run_key(al, pr, sp if sp is not None else pattern, pattern)
        mdl.load_state_dict(dense)
        log.info("grid run %s", key)
        rec = prune(mdl, sparsity=sp, pruner=pr, pattern=pattern, allocation=al, alloc_options=req.alloc_options,
                    pruner_options=req.pruner_options, evaluation=ev, session=sess, progress=progress,
                    use_cache=use_cache, allow_long=allow_long)
        run = {"key": key, "hash": h, "allocation": al, "pruner": pr, "sparsity": rec["sparsity"]["target"],
               "pattern": pattern, "achieved": rec["sparsity"]["achieved"], "per_block": rec["per_block"],
               "ppl": rec["ppl"], "prune_seconds": rec["timing"]["prune_seconds"],
               "alloc_options": config["alloc_options"], "pruner_options": config["pruner_kwargs"],
               "diagnostics": rec["allocation"]["diagnostics"]}
        if ev.tasks:
            run["tasks"], run["zs_average"] = rec["tasks"], rec["zero_shot"]["average"]["acc"]
        mdl.to("cpu")
        res["runs"].append(run)
        save()
    mdl.load_state_dict(dense)
    try:
        from layerprune.report import make_figures

        res["figures"] = make_figures(d, res)
        save()
    except UserError:
        log.warning("matplotlib is not installed: no figures (pip install 'layerprune[plot]')")
    return {"out": str(d), "runs": len(res["runs"]), "skipped": skipped, "results": res["runs"], "dense": res["dense"]}
