"""Plain-text tables for the terminal (the CLI's human output; ``--json`` bypasses them)."""

from __future__ import annotations

import math
from typing import Any


def fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{nd}f}" if abs(x) < 1e4 else f"{x:.3g}"
    return str(x)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    w = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(headers)) + " |"
    sep = "|" + "|".join("-" * (x + 2) for x in w) + "|"
    body = ["| " + " | ".join(r[i].rjust(w[i]) for i in range(len(headers))) + " |" for r in cells]
    return "\n".join([line, sep, *body])


def tasks_table(tasks: dict) -> str:
    return table(["task", "acc", "acc_norm"], [[t, v.get("acc"), v.get("acc_norm")] for t, v in tasks.items()])


def prune_summary(rec: dict) -> str:
    rows = [[b["block"], b["allocated"], b["achieved"], b["seconds"], b.get("peak_mem_mb")] for b in rec["blocks"]]
    out = [table(["block", "allocated", "achieved", "seconds", "peak MiB"], rows), ""]
    s = rec["sparsity"]
    head = ["model", "pruner", "allocation", "pattern", "target", "achieved", "prune s"] + [f"ppl {k}" for k in rec["ppl"]]
    c = rec["config"]
    row = [rec["model"], c["pruner"], c["allocation"], s["pattern"], s["target"], s["achieved"],
           rec["timing"]["prune_seconds"]] + list(rec["ppl"].values())
    if rec.get("dense_ppl"):
        head += [f"dense {k}" for k in rec["dense_ppl"]]
        row += list(rec["dense_ppl"].values())
    out.append(table(head, [row]))
    if rec.get("tasks"):
        out += ["", tasks_table(rec["tasks"])]
    if rec.get("out"):
        out.append(f"\nsaved to {rec['out']}")
    return "\n".join(out)


def eval_summary(rec: dict) -> str:
    rows = [[k, v["ppl"], v["seqlen"], v["windows"], v["tokens"]] for k, v in rec["ppl_details"].items()]
    out = [table(["dataset", "ppl", "seqlen", "windows", "tokens"], rows)] if rows else []
    if rec.get("tasks"):
        out.append(tasks_table(rec["tasks"]))
        avg = rec.get("zero_shot", {}).get("average", {})
        if avg.get("acc") is not None:
            out.append(f"average ({avg['metric']}): {avg['acc']:.4f}")
    return "\n\n".join(out)


def allocate_summary(rec: dict) -> str:
    phi = rec.get("phi")
    rows = [[i, s] + ([phi[i]] if phi else []) for i, s in enumerate(rec["per_block"])]
    hdr = ["block", "sparsity"] + (["phi"] if phi else [])
    mean = sum(s * n for s, n in zip(rec["per_block"], rec["block_sizes"])) / sum(rec["block_sizes"])
    txt = table(hdr, rows) + f"\n\n{rec['method']}: target {rec['target']}, weighted mean {mean:.4f}"
    if "evaluations" in rec:
        txt += f", {rec['evaluations']} evaluations"
    return txt
