"""Figures (matplotlib, Agg) and the self-contained HTML report of a results directory."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from layerprune.errors import UserError


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'layerprune[plot]'") from None
    return plt


def plot_ratios(series: dict[str, list[float]], path: str | Path, title: str = "", target: float | None = None) -> str:
    """Per-block allocated sparsity, one line per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    for name, ys in series.items():
        ax.plot(range(len(ys)), ys, marker="o", ms=3, label=name)
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def make_figures(d: Path, res: dict) -> list[str]:
    """ratios_<sparsity>.png, ppl_vs_sparsity.png, zeroshot_vs_sparsity.png (when tasks ran)."""
    plt = _plt()
    runs = res.get("runs", [])
    out = []
    for sp in sorted({r["sparsity"] for r in runs}):
        series = {f"{r['allocation']}+{r['pruner']}": r["per_block"] for r in runs if r["sparsity"] == sp}
        out.append(plot_ratios(series, d / f"ratios_{sp}.png", f"per-block sparsity, target {sp}", sp))
    ppl_keys = sorted({k for r in runs for k in r.get("ppl", {})})
    if ppl_keys:
        k = ppl_keys[0]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for meth in sorted({(r["allocation"], r["pruner"]) for r in runs}):
            pts = sorted((r["sparsity"], r["ppl"][k]) for r in runs if (r["allocation"], r["pruner"]) == meth and k in r["ppl"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="+".join(meth))
        if res.get("dense", {}).get("ppl", {}).get(k):
            ax.axhline(res["dense"]["ppl"][k], color="grey", ls="--", lw=0.8, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_ylabel(f"{k} perplexity (log)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(d / "ppl_vs_sparsity.png")
        plt.close(fig)
        out.append(str(d / "ppl_vs_sparsity.png"))
    if any(r.get("zs_average") is not None for r in runs):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for meth in sorted({(r["allocation"], r["pruner"]) for r in runs}):
            pts = sorted((r["sparsity"], r["zs_average"]) for r in runs if (r["allocation"], r["pruner"]) == meth
                         and r.get("zs_average") is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="+".join(meth))
        ax.set_xlabel("sparsity")
        ax.set_ylabel("zero-shot average acc")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(d / "zeroshot_vs_sparsity.png")
        plt.close(fig)
        out.append(str(d / "zeroshot_vs_sparsity.png"))
    return out


def render_html(d: Path, res: dict) -> Path:
    runs = res.get("runs", [])
    ppl_keys = sorted({k for r in runs for k in r.get("ppl", {})})
    task_keys = sorted({k for r in runs for k in r.get("tasks", {})})
    esc = html.escape
    head = ["allocation", "pruner", "sparsity", "achieved"] + [f"ppl {k}" for k in ppl_keys] + task_keys + \
           (["zero-shot avg"] if task_keys else [])

    def cell(x: object) -> str:
        return f"{x:.4g}" if isinstance(x, float) else esc(str(x if x is not None else "-"))

    rows = []
    dense = res.get("dense", {})
    if dense:
        rows.append(["dense", "-", 0.0, 0.0] + [dense.get("ppl", {}).get(k) for k in ppl_keys] +
                    [dense.get("tasks", {}).get(t, {}).get("acc") for t in task_keys] +
                    ([dense.get("zs_average")] if task_keys else []))
    for r in runs:
        rows.append([r["allocation"], r["pruner"], r["sparsity"], r.get("achieved")] + [r["ppl"].get(k) for k in ppl_keys] +
                    [r.get("tasks", {}).get(t, {}).get("acc") for t in task_keys] + ([r.get("zs_average")] if task_keys else []))
    table = "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" + "".join(
        "<tr data-run>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>"
    imgs = []
    for png in sorted(d.glob("*.png")):
        b64 = base64.b64encode(png.read_bytes()).decode()
        imgs.append(f"<figure><img alt='{esc(png.stem)}' src='data:image/png;base64,{b64}'><figcaption>{esc(png.stem)}</figcaption></figure>")
    settings = esc(json.dumps(res.get("settings", {})))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>layerprune report — {esc(str(res.get('model')))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#eee}}figure{{display:inline-block;margin:1em}}img{{max-width:520px}}</style></head><body>
<h1>layerprune report: {esc(str(res.get('model')))}</h1>
<p>{len(runs)} runs. Settings: <code>{settings}</code>. Versions: <code>{esc(json.dumps(res.get('versions', {})))}</code></p>
<h2>Results</h2>{table}<h2>Figures</h2>{''.join(imgs) or '<p>(no figures: matplotlib missing)</p>'}
</body></html>"""
    out = d / "report.html"
    out.write_text(page)
    return out


def write_report(d: str | Path) -> dict:
    """Figures (when missing) and ``report.html`` for a results directory; refuses before writing anything
    when ``results.json`` is missing, damaged or holds no runs."""
    from layerprune.compare import load_results

    d = Path(d)
    if not (d / "results.json").is_file():
        raise UserError(f"{d} has no results.json: run `layerprune compare ... --out {d}` first")
    res = load_results(d)
    if not res.get("runs"):
        raise UserError(f"{d}/results.json holds no finished runs yet: run `layerprune compare ... --out {d}` first")
    if not list(d.glob("*.png")):
        try:
            make_figures(d, res)
        except UserError:
            pass
    out = render_html(d, res)
    return {"report": str(out), "runs": len(res["runs"])}
