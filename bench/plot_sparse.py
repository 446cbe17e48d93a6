"""The per-linear speed-ups of one ``bench/sparse_decode.py --parts linears`` run as a figure and a goals table: the
op's speed-up over dense ``F.linear`` against the tokens of a call, one line per weight shape, the ``delta`` layout
(the default) solid, ``bitmask`` dashed and, for 2:4 weights where the run has it, ``nm24`` dotted, one panel per
sparsity; the sparse-inference issue's goals drawn in. The table gives, per sparsity and tokens, the fastest layout's
range over the shapes and how many meet the goal.

    python3 bench/plot_sparse.py bench/results/sparse_goals_session26_h200.json --png bench/results/sparse_goals_session26_h200.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

SEVEN_B = {(4096, 4096), (11008, 4096), (4096, 11008), (1024, 4096), (14336, 4096), (4096, 14336)}


def goal(sparsity, batch: int, shape: tuple[int, int]) -> float | None:
    """The issue's goal for one row: ≥ 1.8× at 70% and one token on 7B/8B shapes, ≥ 2.2× on 70B shapes, ≥ 1.3× at
    50%; never below 0.95× at 64 tokens or in a 2048-token prefill."""
    if batch == 1 and sparsity == 0.7:
        return 1.8 if shape in SEVEN_B else 2.2
    if batch == 1 and sparsity == 0.5:
        return 1.3
    if batch in (64, 2048):
        return 0.95
    return None


def best(row: dict) -> float:
    return max(row["speedup"], row["bitmask_speedup"], row.get("nm24_speedup", 0.0))


def table(rows: list[dict]) -> list[str]:
    groups: dict = defaultdict(list)
    for r in rows:
        groups[(str(r["sparsity"]), r["batch"])].append(r)
    out = ["| sparsity | tokens | fastest layout, speed-up over dense (range over shapes) | goal | shapes meeting it |",
           "| --- | --- | --- | --- | --- |"]
    for (s, b), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        v = [best(r) for r in rs]
        goals = [goal(r["sparsity"], b, tuple(r["shape"])) for r in rs]
        met = [x >= g for x, g in zip(v, goals) if g is not None]
        gtxt = ", ".join(sorted({f"≥ {g:g}×" for g in goals if g is not None})) or "–"
        out.append(f"| {s} | {b} | {min(v):.2f}–{max(v):.2f}× | {gtxt} | "
                   f"{f'{sum(met)} of {len(met)}' if met else '–'} |")
    return out


def plot(rows: list[dict], png: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sparsities = sorted({str(r["sparsity"]) for r in rows}, key=lambda s: (s == "2:4", s))
    shapes = sorted({tuple(r["shape"]) for r in rows}, key=lambda s: (s[0] * s[1], s))
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(sparsities), figsize=(5.2 * len(sparsities), 4.6), sharey=True)
    axes = [axes] if len(sparsities) == 1 else list(axes)
    for ax, s in zip(axes, sparsities):
        for i, shape in enumerate(shapes):
            rs = sorted((r for r in rows if str(r["sparsity"]) == s and tuple(r["shape"]) == shape),
                        key=lambda r: r["batch"])
            if not rs:
                continue
            b = [r["batch"] for r in rs]
            ax.plot(b, [r["speedup"] for r in rs], "-o", ms=3, color=colors(i), label=f"{shape[0]}×{shape[1]}")
            ax.plot(b, [r["bitmask_speedup"] for r in rs], "--", lw=1, color=colors(i), alpha=0.7)
            if all("nm24_speedup" in r for r in rs):
                ax.plot(b, [r["nm24_speedup"] for r in rs], ":", lw=1.6, color=colors(i))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.95, color="r", lw=0.8, ls=":", label="0.95× (goal at 64 tokens and prefill)")
        for g, text in {"0.7": ((1.8, "goal 1.8× (7B/8B)"), (2.2, "goal 2.2× (70B)")),
                        "0.5": ((1.3, "goal 1.3×"),)}.get(s, ()):
            ax.scatter([1], [g], marker="_", s=300, color="r", zorder=5)
            ax.annotate(text, (1.15, g), fontsize=7, color="r", va="center")
        ax.set_xscale("log", base=2)
        ticks = sorted({r["batch"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
        ax.set_xlabel("tokens a call")
        ax.set_title(f"sparsity {s}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speed-up over dense F.linear")
    axes[-1].legend(fontsize=7, loc="upper right", title="no data between 64 and 2048 tokens", title_fontsize=7)
    fig.suptitle(title + "\nsolid: delta layout, dashed: bitmask, dotted: nm24 (2:4 weights)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--png", required=True)
    a = ap.parse_args()
    res = json.load(open(a.json))
    rows = res["linears"]
    plot(rows, a.png, f"{res.get('device', '?')}, torch {res.get('torch', '?')}, bf16, L2 flushed, median µs: "
                      f"{a.json.split('/')[-1]}")
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
