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


def cells(runs: list[dict]) -> list[dict]:
    """Runs grouped by (allocation, pruner, sparsity, pattern) over calibration seeds: each metric's mean,
    sample standard deviation (0 for one seed) and the seeds, in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["allocation"], r["pruner"], r["sparsity"], r["pattern"]), []).append(r)
    out = []
    for (al, pr, sp, pat), rs in groups.items():
        def stat(vals: list[float]) -> tuple[float | None, float | None]:
            vals = [v for v in vals if v is not None]
            if not vals:
                return None, None
            m = sum(vals) / len(vals)
            sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
            return m, sd
        ppl = {k: stat([r.get("ppl", {}).get(k) for r in rs]) for k in sorted({k for r in rs for k in r.get("ppl", {})})}
        tasks = {t: stat([r.get("tasks", {}).get(t, {}).get("acc") for r in rs])
                 for t in sorted({t for r in rs for t in r.get("tasks", {})})}
        nb = len(rs[0]["per_block"])
        out.append({"allocation": al, "pruner": pr, "sparsity": sp, "pattern": pat, "seeds": [r.get("seed", 0) for r in rs],
                    "achieved": stat([r.get("achieved") for r in rs])[0], "ppl": ppl, "tasks": tasks,
                    "zs_average": stat([r.get("zs_average") for r in rs]),
                    "per_block": [sum(r["per_block"][i] for r in rs) / len(rs) for i in range(nb)],
                    "prune_seconds": stat([r.get("prune_seconds") for r in rs])[0]})
    return out


def _pm(m: float | None, sd: float | None, n: int) -> str | float | None:
    if m is None:
        return None
    return m if n <= 1 else f"{m:.4g} ± {sd:.2g}"


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
    if not dense_row:  # the CSV: one row per run, with its seed
        header = header[:4] + ["seed"] + header[4:]
        for r in runs:
            row = [r["allocation"], r["pruner"], r["sparsity"], r["pattern"], r.get("seed", 0), r.get("achieved")]
            row += [r.get("ppl", {}).get(k) for k in ppl_keys]
            row += [r.get("tasks", {}).get(t, {}).get("acc") for t in task_keys]
            if task_keys:
                row.append(r.get("zs_average"))
            row.append(r.get("prune_seconds"))
            rows.append(row)
        return header, rows
    header = header[:4] + ["seeds"] + header[4:]
    rows = [r[:4] + [1] + r[4:] for r in rows]
    for c in cells(runs):
        n = len(c["seeds"])
        row = [c["allocation"], c["pruner"], c["sparsity"], c["pattern"], n, c["achieved"]]
        row += [_pm(*c["ppl"].get(k, (None, None)), n) for k in ppl_keys]
        row += [_pm(*c["tasks"].get(t, (None, None)), n) for t in task_keys]
        if task_keys:
            row.append(_pm(*c["zs_average"], n))
        row.append(c["prune_seconds"])
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
             render: Callable[[list[str], list[list]], str] | None = None, seeds: list[int] | None = None) -> dict:
    """Run every (seed, sparsity, pruner, allocation) cell not yet in ``out/results.json``; returns a summary.
    ``seeds``: calibration seeds (default: the calibration config's one); tables report mean ± std over them."""
    from layerprune.api import EvalConfig, Session, calib_config, load, plan_prune
    from layerprune.data.sources import data_dir as resolve_data_dir
    from layerprune.models.loading import check_model_spec
    from layerprune.record import now, versions
    from layerprune.utils import resolve_device

    render = render or (lambda h, r: "\n".join(",".join(map(str, x)) for x in [h, *r]))
    # ---- validate every cell before anything is loaded or created
    reqs = {(sp, pr, al): plan_prune(sp, pr, pattern, al, alloc_options(al), pruner_options(pr))
            for sp in sparsities for pr in pruners for al in allocations}
    cal = calib_config(calib)
    seeds = list(seeds) if seeds else [cal.seed]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds has repeats: {seeds}")
    ev = (evaluation or EvalConfig()).validate()
    root = resolve_data_dir(data_dir)
    d = Path(out)
    if d.exists() and (not d.is_dir() or (any(d.iterdir()) and not (d / "results.json").is_file())):
        raise UserError(f"--out {d} exists and is not a layerprune results directory: choose another")
    res = load_results(d)
    check_model_spec(model)
    dev = resolve_device(device)
    mdl, tok, src = load(model, None, dtype, trust_remote_code)
    import dataclasses

    sessions = {sd: Session(mdl, tok, dev, dataclasses.replace(cal, seed=sd), progress=progress, use_cache=use_cache,
                            data_dir=root) for sd in seeds}
    sess = sessions[seeds[0]]
    for other in sessions.values():  # one model: hash its weights once
        other._whash = sess.weights_hash()
        other.full_stats = True  # several allocations read the statistics: one sweep computes them all
    if res and res.get("weights") != sess.weights_hash():
        raise UserError(f"{d} holds results of a different model ({res.get('model')}): use a new --out directory")
    d.mkdir(parents=True, exist_ok=True)
    res.setdefault("model", src)
    res.setdefault("weights", sess.weights_hash())
    res.setdefault("created", now())
    res["versions"] = versions()
    res.setdefault("runs", [])
    res["settings"] = {**cal.key(), "seeds": seeds, "eval_seqlen": ev.seqlen or cal.seqlen, "eval_max_windows": ev.max_windows,
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

            zs = zero_shot(mdl, tok, list(ev.tasks), ev.limit, batch_size=ev.task_batch_size, device=dev,
                           data_dir=root)
            res["dense"]["tasks"], res["dense"]["zs_average"] = zs["tasks"], zs["average"]["acc"]
        mdl.to("cpu")
        save()
    skipped = 0
    for seed in seeds:
        for (sp, pr, al), req in reqs.items():
            config = {**req.config(src, sessions[seed].calib_cfg, dtype), "eval": dense_key["eval"]}
            h = cell_hash(config)
            if h in done:
                skipped += 1
                continue
            run = _grid_run(mdl, dense, sessions[seed], req, sp, pr, al, pattern, ev, config, h, progress,
                            use_cache, allow_long)
            run["seed"] = seed
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


def _grid_run(mdl, dense, sess, req, sp, pr, al, pattern, ev, config, h, progress, use_cache, allow_long) -> dict:
    """One cell: restore the dense weights, prune and evaluate through ``prune``; the run's summary."""
    from layerprune.api import prune

    key = run_key(al, pr, sp if sp is not None else pattern, pattern)
    mdl.load_state_dict(dense)
    log.info("grid run %s (seed %d)", key, sess.seed)
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
    return run
