"""Which allocation claims hold across calibration seeds and models: reads the merged grids of the quality run
(one directory per model, bench/merge_grids.py) and compares allocations cell by cell, *paired by seed*.

    python3 bench/quality_claims.py bench/results/quality_h200 [--json OUT.json]

A comparison "a beats b" in one (model, pruner, sparsity) cell holds when, for every seed both ran, a's
perplexity is lower than b's of the same seed on WikiText-2 and on C4. It "loses" when b is lower for every
seed on both datasets; anything else is "mixed" (the seeds or the datasets disagree). Cells with one seed
are marked so: they are not evidence that survives a change of seed.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

DATASETS = ("wikitext2", "c4")
PAIRS = [("svnup", "uniform"), ("owl", "uniform"), ("dlp", "uniform"), ("alphapruning", "uniform"), ("dlp", "owl"),
         ("svnup", "owl")]


def load(root: Path) -> dict:
    """model -> (pruner, sparsity) -> allocation -> seed -> {dataset: ppl}."""
    grids: dict = {}
    for f in sorted(root.glob("*/results.json")):
        res = json.loads(f.read_text())
        g: dict = defaultdict(lambda: defaultdict(dict))
        for r in res["runs"]:
            g[(r["pruner"], r["sparsity"])][r["allocation"]][r.get("seed", 0)] = r["ppl"]
        grids[res.get("model", f.parent.name)] = g
    return grids


def verdict(a: dict, b: dict) -> dict | None:
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    lower = [all(a[s][d] < b[s][d] for s in seeds) for d in DATASETS]
    higher = [all(a[s][d] > b[s][d] for s in seeds) for d in DATASETS]
    mean = lambda x, d: sum(x[s][d] for s in seeds) / len(seeds)  # noqa: E731
    ratio = {d: mean(a, d) / mean(b, d) for d in DATASETS}
    v = "beats" if all(lower) else "loses" if all(higher) else "mixed"
    return {"verdict": v, "seeds": seeds, "ratio": ratio}


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
    for a, b in PAIRS:
        mine = [r for r in rows if (r["a"], r["b"]) == (a, b)]
        if not mine:
            continue
        multi = [r for r in mine if len(r["seeds"]) > 1]
        count = lambda rs, v: sum(r["verdict"] == v for r in rs)  # noqa: E731
        lines.append(f"### {a} vs {b}: beats in {count(mine, 'beats')}, loses in {count(mine, 'loses')}, mixed in "
                     f"{count(mine, 'mixed')} of {len(mine)} cells; with 3 seeds: {count(multi, 'beats')} / "
                     f"{count(multi, 'loses')} / {count(multi, 'mixed')} of {len(multi)}")
        lines.append("")
        lines.append("| model | pruner | sparsity | seeds | verdict | WikiText-2 ratio | C4 ratio |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for r in mine:
            lines.append(f"| {r['model']} | {r['pruner']} | {r['sparsity']:.0%} | {len(r['seeds'])} | {r['verdict']} | "
                         f"{r['ratio']['wikitext2']:.2f} | {r['ratio']['c4']:.2f} |")
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
