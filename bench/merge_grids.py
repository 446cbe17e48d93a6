"""Merge `layerprune compare` directories that ran the same grid with different calibration seeds (e.g. one
seed per GPU, `bench/quality_grid.sh`) into one directory: runs concatenated, tables with mean ± std over the
seeds, figures; then `layerprune report OUT` writes the HTML page.

    python3 bench/merge_grids.py OUT DIR [DIR ...] [--name NAME]

--name: the model's name in the tables (e.g. the alias, where the runs named a carried file by its path).

Refuses directories of different models (weight hashes) or different settings other than the seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layerprune.cli.tables import table  # noqa: E402
from layerprune.compare import load_results, write_tables  # noqa: E402
from layerprune.errors import UserError  # noqa: E402
from layerprune.utils import write_atomic  # noqa: E402


def merge(dirs: list[Path]) -> dict:
    parts = [load_results(d) for d in dirs]
    if not parts or any(not p for p in parts):
        raise UserError(f"no results.json in one of {', '.join(map(str, dirs))}")
    base = parts[0]
    same = lambda p, k: p.get(k) == base.get(k)  # noqa: E731
    for d, p in zip(dirs, parts):
        if not same(p, "weights"):
            raise UserError(f"{d} holds results of another model than {dirs[0]}")
        a = {k: v for k, v in p["settings"].items() if k not in ("seed", "seeds")}
        b = {k: v for k, v in base["settings"].items() if k not in ("seed", "seeds")}
        if a != b:
            raise UserError(f"{d} ran other settings than {dirs[0]}: {sorted(k for k in a if a[k] != b.get(k))}")
    out = {k: v for k, v in base.items() if k not in ("runs", "figures")}
    seen, runs = set(), []
    for p in parts:
        for r in p["runs"]:
            if r["hash"] not in seen:
                seen.add(r["hash"])
                runs.append(r)
    out["runs"] = runs
    out["settings"] = {**base["settings"], "seeds": sorted({r.get("seed", 0) for r in runs})}
    out["merged_from"] = [str(d) for d in dirs]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description="Merge per-seed `layerprune compare` directories into one.")
    ap.add_argument("out", type=Path)
    ap.add_argument("dirs", type=Path, nargs="+")
    ap.add_argument("--name", default=None, help="the model's name in the tables (e.g. its alias)")
    a = ap.parse_args()
    out = a.out
    try:
        res = merge(a.dirs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.name:
        res["source"], res["model"] = res.get("model"), a.name
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", json.dumps(res, indent=1, default=str))
    write_tables(out, res, table)
    try:
        from layerprune.report import make_figures

        res["figures"] = make_figures(out, res)
        write_atomic(out / "results.json", json.dumps(res, indent=1, default=str))
    except UserError as e:
        print(f"no figures: {e}", file=sys.stderr)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
