"""Which allocation claims hold across calibration seeds and models: reads the merged grids of the quality run
(one directory per model, bench/merge_grids.py) and compares allocations cell by cell, *paired by seed*.

    python3 bench/quality_claims.py bench/results/quality_h200 [--json OUT.json]

Perplexity: "a beats b" in one (grid, pruner, sparsity) cell holds when, for every seed both ran, a's perplexity
is lower than b's of the same seed on WikiText-2 and on C4 (each of the two the cell has). It "loses" when b is
lower for every seed on each dataset; anything else is "mixed" (the seeds or the datasets disagree). A grid run
with zero-shot tasks is judged on the mean accuracy over its tasks instead (higher is better, every seed), and
its perplexity is left to the grids without tasks. Cells with one seed are marked so: they are not evidence that
survives a change of seed.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

DATASETS = ("wikitext2", "c4")
PAIRS = [("svnup", "uniform"), ("owl", "uniform"), ("dlp", "uniform"), ("alphapruning", "uniform"), ("dlp", "owl"),
         ("svnup", "owl"), ("svnup", "dlp"), ("svnup", "alphapruning")]


def load(root: Path) -> dict:
    """grid directory -> (pruner, sparsity) -> allocation -> seed -> {metric: value}, where the metrics are the
    perplexities by dataset and, for a grid with tasks, ``zeroshot`` (the mean accuracy over its tasks)."""
    grids: dict = {}
    for f in sorted(root.glob("*/results.json")):
        res = json.loads(f.read_text())
        g: dict = defaultdict(lambda: defaultdict(dict))
        for r in res["runs"]:
            m = dict(r["ppl"]) if r.get("zs_average") is None else {"zeroshot": r["zs_average"]}
            g[(r["pruner"], r["sparsity"])][r["allocation"]][r.get("seed", 0)] = m
        grids[f.parent.name] = g
    return grids


def verdict(a: dict, b: dict) -> dict | None:
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    zs = "zeroshot" in a[seeds[0]]
    metrics = ["zeroshot"] if zs else [d for d in DATASETS if all(d in a[s] and d in b[s] for s in seeds)]
    if not metrics:
        return None
    sign = -1 if zs else 1  # "better" is lower perplexity, higher accuracy
    better = [all(sign * a[s][d] < sign * b[s][d] for s in seeds) for d in metrics]
    worse = [all(sign * a[s][d] > sign * b[s][d] for s in seeds) for d in metrics]
    mean = lambda x, d: sum(x[s][d] for s in seeds) / len(seeds)  # noqa: E731
    ratio = {d: mean(a, d) / mean(b, d) for d in metrics}
    v = "beats" if all(better) else "loses" if all(worse) else "mixed"
    return {"verdict": v, "seeds": seeds, "metric": "zeroshot" if zs else "ppl", "ratio": ratio}


def claims(grids: dict) -> list[dict]:
    out = []
    for model, g in grids.items():
        for (pr, sp), cell in sorted(g.items()):
            for a, b in PAIRS:
                if a in cell and b in cell:
                    v = verdict(cell[a], cell[b])
                    if v:
                        out.append({"model": model, "pruner": pr, "sparsity": sp, "a": a, "b": b, **v})
    return out


def render(rows: list[dict]) -> str:
    lines = []
    for metric, title in (("ppl", "perplexity"), ("zeroshot", "zero-shot mean accuracy")):
        for a, b in PAIRS:
            mine = [r for r in rows if (r["a"], r["b"]) == (a, b) and r["metric"] == metric]
            if not mine:
                continue
            multi = [r for r in mine if len(r["seeds"]) > 1]
            count = lambda rs, v: sum(r["verdict"] == v for r in rs)  # noqa: E731
            lines.append(f"### {a} vs {b}, {title}: beats in {count(mine, 'beats')}, loses in {count(mine, 'loses')}, "
                         f"mixed in {count(mine, 'mixed')} of {len(mine)} cells; with 3 seeds: {count(multi, 'beats')} / "
                         f"{count(multi, 'loses')} / {count(multi, 'mixed')} of {len(multi)}")
            lines.append("")
            cols = ["WikiText-2 ratio", "C4 ratio"] if metric == "ppl" else ["accuracy ratio"]
            keys = ["wikitext2", "c4"] if metric == "ppl" else ["zeroshot"]
            lines.append("| grid | pruner | sparsity | seeds | verdict | " + " | ".join(cols) + " |")
            lines.append("| --- " * (5 + len(cols)) + "|")
            for r in mine:
                vals = " | ".join(f"{r['ratio'][k]:.3f}" if k in r["ratio"] else "–" for k in keys)
                lines.append(f"| {r['model']} | {r['pruner']} | {r['sparsity']:.0%} | {len(r['seeds'])} | "
                             f"{r['verdict']} | {vals} |")
            lines.append("")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    rows = claims(load(Path(sys.argv[1])))
    print(render(rows))
    if "--json" in sys.argv:
        Path(sys.argv[sys.argv.index("--json") + 1]).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
