"""Figures (matplotlib, Agg) and the self-contained HTML report of a results directory."""

from __future__ import annotations

import base64
import html
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


PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
STYLES = ["-", "--", ":", "-."]


def colour(allocation: str) -> str:
    """One colour per allocation, the same in every figure (registry order, then by name)."""
    from layerprune.allocation import ALLOCATORS

    names = list(ALLOCATORS)
    i = names.index(allocation) if allocation in names else len(names) + sum(map(ord, allocation))
    return PALETTE[i % len(PALETTE)]


def _style(pruner: str, pruners: list[str]) -> str:
    return STYLES[sorted(pruners).index(pruner) % len(STYLES)] if pruner in pruners else "-"


def plot_ratios(series: dict[str, list[float]], path: str | Path, title: str = "", target: float | None = None) -> str:
    """Per-block allocated sparsity, one line per method (``allocation`` or ``allocation+pruner``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9.5, 4), dpi=120)
    pruners = sorted({n.split("+")[1] for n in series if "+" in n})
    for name, ys in series.items():
        al, _, pr = name.partition("+")
        ax.plot(range(len(ys)), ys, marker="o", ms=3, label=name, color=colour(al), ls=_style(pr, pruners))
    if target is not None:
        ax.axhline(target, color="grey", ls="--", lw=0.8, label="target")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder block (input → output)")
    ax.set_ylabel("sparsity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside, never on a line
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


CAPTIONS = {
    "ratios": "Per-block sparsity each allocation gave at target {sp} (mean over seeds). Blocks run from the input "
              "(left) to the output (right); the dashed line is the target. A line below the target protects "
              "those blocks; the parameter-weighted mean of every line is the target.",
    "ppl_vs_sparsity": "{k} perplexity (log scale) against target sparsity, one colour per allocation, one line "
                       "style per pruner; error bars are ± one standard deviation over calibration seeds. Lower is "
                       "better; the dashed line is the dense model.",
    "zeroshot_vs_sparsity": "Mean zero-shot accuracy over the papers' tasks present, against target sparsity; error "
                            "bars ± one standard deviation over seeds. Higher is better; dashed: dense.",
}


def make_figures(d: Path, res: dict) -> list[str]:
    """ratios_<sparsity>.png, ppl_vs_sparsity.png, zeroshot_vs_sparsity.png (when tasks ran)."""
    from layerprune.compare import cells

    plt = _plt()
    cs = cells(res.get("runs", []))
    out = []
    for sp in sorted({c["sparsity"] for c in cs}):
        series = {f"{c['allocation']}+{c['pruner']}": c["per_block"] for c in cs if c["sparsity"] == sp}
        out.append(plot_ratios(series, d / f"ratios_{sp}.png", f"per-block sparsity, target {sp}", sp))
    pruners = sorted({c["pruner"] for c in cs})
    dense = res.get("dense", {})

    def curve(name: str, ylabel: str, get, dense_y, log: bool) -> None:
        fig, ax = plt.subplots(figsize=(7.5, 4), dpi=120)
        for meth in sorted({(c["allocation"], c["pruner"]) for c in cs}):
            pts = sorted((c["sparsity"], *get(c)) for c in cs if (c["allocation"], c["pruner"]) == meth
                         and get(c)[0] is not None)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0 for p in pts], marker="o",
                            capsize=3, label="+".join(meth), color=colour(meth[0]), ls=_style(meth[1], pruners))
        if dense_y:
            ax.axhline(dense_y, color="grey", ls="--", lw=0.8, label="dense")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("target sparsity")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.tight_layout()
        fig.savefig(d / f"{name}.png")
        plt.close(fig)
        out.append(str(d / f"{name}.png"))

    ppl_keys = sorted({k for c in cs for k in c["ppl"]})
    if ppl_keys:
        k = ppl_keys[0]
        curve("ppl_vs_sparsity", f"{k} perplexity (log)", lambda c: c["ppl"].get(k, (None, None)),
              dense.get("ppl", {}).get(k), True)
    if any(c["zs_average"][0] is not None for c in cs):
        curve("zeroshot_vs_sparsity", "zero-shot average acc", lambda c: c["zs_average"], dense.get("zs_average"), False)
    return out


def _kv_table(d: dict) -> str:
    esc = html.escape
    return "<table class='kv'>" + "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>"
                                          for k, v in d.items()) + "</table>"


def render_html(d: Path, res: dict) -> Path:
    """One self-contained page: settings and versions as tables, the grid (mean ± std over seeds, the dense
    baseline first), and each figure with a caption that says how to read it."""
    from layerprune.compare import table_rows

    esc = html.escape
    head, rows = table_rows(res)

    def cell(x: object) -> str:
        return f"{x:.4g}" if isinstance(x, float) else esc(str(x if x is not None else "-"))

    table = "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" + "".join(
        "<tr data-run>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>"
    figs = []
    for png in sorted(d.glob("*.png")):
        stem = png.stem
        key = "ratios" if stem.startswith("ratios_") else stem
        cap = CAPTIONS.get(key, stem).format(sp=stem.split("_", 1)[-1], k=(sorted({k for r in res.get("runs", [])
                                                                                  for k in r.get("ppl", {})}) or ["-"])[0])
        b64 = base64.b64encode(png.read_bytes()).decode()
        figs.append(f"<figure><img alt='{esc(stem)}' src='data:image/png;base64,{b64}'>"
                    f"<figcaption>{esc(cap)}</figcaption></figure>")
    n_runs = len(res.get("runs", []))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>layerprune report — {esc(str(res.get('model')))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin-bottom:1em}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}th{{background:#eee}}table.kv td,table.kv th{{text-align:left}}
figure{{display:inline-block;margin:1em;max-width:520px;vertical-align:top}}img{{max-width:520px}}
figcaption{{font-size:0.9em;color:#333}}</style></head><body>
<h1>layerprune report: {esc(str(res.get('model')))}</h1>
<p>{n_runs} runs. Perplexity cells give mean ± standard deviation over the calibration seeds when there are
several; the first row is the dense model.</p>
<h2>Results</h2>{table}<h2>Figures</h2>{''.join(figs) or '<p>(no figures: matplotlib missing)</p>'}
<h2>Settings</h2>{_kv_table(res.get('settings', {}))}<h2>Versions</h2>{_kv_table(res.get('versions', {}))}
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
