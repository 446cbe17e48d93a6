"""Command line: ``layerprune {prune,allocate,eval,compare,report,finetune,quantize,ls}``.

Contract (other tools rely on it): ``--json`` prints exactly one JSON object on stdout, everything
else (logs, progress) goes to stderr; exit 0 on success, 2 on bad input (one line naming the fix),
1 on any other failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from layerprune.errors import UserError

log = logging.getLogger("layerprune")


def _csv(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    p.add_argument("--data-dir", default=None, help="local data directory (default $LAYERPRUNE_DATA)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.add_argument("--config", default=None, help="YAML file whose keys set defaults for these flags")


def _calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="c4", help="calibration source (default c4)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="calibration window length (default 2048)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per block forward (default 8)")
    p.add_argument("--offload", default="auto", choices=["auto", "cpu", "device"],
                   help="where calibration activations live (default: on the GPU if they fit)")
    p.add_argument("--no-cache", action="store_true", help="recompute dense statistics and ratios")


def _alloc(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("allocation options (each method reads its own)")
    g.add_argument("--alpha", type=float, default=None, help="DLP band half-width α (default 0.15)")
    g.add_argument("--stat", default=None, choices=["median", "mean"], help="DLP statistic (default median = paper)")
    g.add_argument("--granularity", default=None, choices=["block", "linear"], help="DLP/OWL (default block)")
    g.add_argument("--lam", type=float, default=None, help="OWL / SV-NUP λ (default 0.08)")
    g.add_argument("--M", dest="owl_m", type=float, default=None, help="OWL outlier threshold M (default 5)")
    g.add_argument("--epsilon", type=float, default=None, help="AlphaPruning ε (default 0.3)")
    g.add_argument("--mapping-type", default=None, choices=["block_wise", "layer_wise"], help="AlphaPruning")
    g.add_argument("--xmin-window", default=None, choices=["code", "intended"], help="AlphaPruning (default code)")
    g.add_argument("--window", type=int, default=None, help="SV-NUP window w (default 4)")
    g.add_argument("--absent", default=None, choices=["pruned", "removed"], help="SV-NUP non-member state (default pruned)")
    g.add_argument("--background", default=None, choices=["dense", "pruned"],
                   help="SV-NUP blocks outside the window (default pruned: chosen on C4 held-out ppl, BENCHMARKS.md)")
    g.add_argument("--payoff", default=None, choices=["nll", "ppl"], help="SV-NUP payoff (default nll)")
    g.add_argument("--sv-samples", type=int, default=None, help="SV-NUP evaluation windows (default 32)")
    g.add_argument("--aggregate", default=None, choices=["center", "mean"], help="SV-NUP window aggregation")
    g.add_argument("--stride", type=int, default=None, help="SV-NUP window stride: 1 or w")
    g.add_argument("--mapping", default=None, choices=["band", "proportional"], help="SV-NUP φ → sparsity")
    g.add_argument("--yes", action="store_true", help="run an SV computation estimated to take over an hour")
    g.add_argument("--sv-fp32", action="store_true", help="SV-NUP coalition forwards in full fp32 (default TF32 on CUDA)")


def alloc_options(method: str, a: argparse.Namespace) -> dict:
    table: dict[str, dict[str, Any]] = {
        "dlp": {"alpha": a.alpha, "stat": a.stat, "granularity": a.granularity},
        "owl": {"lam": a.lam, "M": a.owl_m, "granularity": a.granularity},
        "alphapruning": {"epsilon": a.epsilon, "mapping": a.mapping_type, "xmin_window": a.xmin_window},
        "svnup": {"window": a.window, "lam": a.lam, "absent": a.absent, "background": a.background,
                  "payoff": a.payoff, "sv_samples": a.sv_samples, "aggregate": a.aggregate, "stride": a.stride,
                  "mapping": a.mapping, "yes": a.yes or None, "tf32": False if a.sv_fp32 else None},
        "uniform": {},
    }
    return {k: v for k, v in table.get(method, {}).items() if v is not None}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="layerprune", description="Post-training LLM pruning with per-layer sparsity.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prune", help="prune a model (allocate, prune block by block, evaluate, export)")
    p.add_argument("model")
    p.add_argument("--sparsity", type=float, default=None, help="target sparsity in [0, 1) (e.g. 0.7)")
    p.add_argument("--pruner", default="wanda", help="wanda | sparsegpt | magnitude (default wanda)")
    p.add_argument("--pattern", default="unstructured", help="unstructured | N:M, e.g. 2:4 (default unstructured)")
    p.add_argument("--allocation", default="uniform", help="uniform | owl | alphapruning | dlp | svnup")
    p.add_argument("--eval", default="wikitext2", help="perplexity datasets after pruning, comma separated ('' for none)")
    p.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window (default --seqlen)")
    p.add_argument("--eval-max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--dense-ppl", action="store_true", help="also evaluate the dense model first")
    p.add_argument("--tasks", default="", help="zero-shot tasks after pruning (lm-eval), comma separated")
    p.add_argument("--limit", type=int, default=None, help="documents per zero-shot task")
    p.add_argument("--blocksize", type=int, default=None, help="SparseGPT column block (default 128)")
    p.add_argument("--percdamp", type=float, default=None, help="SparseGPT damping (default 0.01)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"], help="quantize surviving weights after pruning")
    p.add_argument("--group-size", type=int, default=None, help="quantization group size (default per channel)")
    p.add_argument("--out", default=None, help="write the pruned model + layerprune.json here (resumable)")
    _calib(p)
    _alloc(p)
    _common(p)

    a = sub.add_parser("allocate", help="compute per-block sparsities of one allocation method")
    a.add_argument("model")
    a.add_argument("--allocation", default="dlp")
    a.add_argument("--sparsity", type=float, default=0.7)
    a.add_argument("--pattern", default="unstructured")
    a.add_argument("--pruner", default="sparsegpt", help="base pruner inside the SV-NUP game (default sparsegpt)")
    a.add_argument("--plot", default=None, help="write a PNG of the per-block ratios")
    _calib(a)
    _alloc(a)
    _common(a)

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model")
    e.add_argument("model")
    e.add_argument("--ppl", default="wikitext2", help="datasets, comma separated: wikitext2,c4,ptb ('' for none)")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward (perplexity)")
    e.add_argument("--tasks", default="", help="zero-shot tasks (lm-eval), comma separated")
    e.add_argument("--limit", type=int, default=None, help="documents per zero-shot task")
    e.add_argument("--task-batch-size", default="16", help="lm-eval batch size")
    _common(e)

    c = sub.add_parser("compare", help="run a grid of (allocation, pruner, sparsity) and write tables")
    c.add_argument("model")
    c.add_argument("--allocations", default="uniform,dlp")
    c.add_argument("--pruners", default="wanda")
    c.add_argument("--sparsities", default="0.5")
    c.add_argument("--pattern", default="unstructured")
    c.add_argument("--ppl", default="wikitext2")
    c.add_argument("--eval-seqlen", type=int, default=None)
    c.add_argument("--eval-max-windows", type=int, default=None)
    c.add_argument("--tasks", default="")
    c.add_argument("--limit", type=int, default=None)
    c.add_argument("--out", required=True)
    _calib(c)
    _alloc(c)
    _common(c)

    r = sub.add_parser("report", help="turn a compare results directory into one HTML page")
    r.add_argument("dir")
    r.add_argument("--json", action="store_true")
    r.add_argument("--quiet", action="store_true")
    r.add_argument("--config", default=None)
    r.add_argument("--data-dir", default=None)

    f = sub.add_parser("finetune", help="LoRA recovery fine-tuning that keeps the sparsity")
    f.add_argument("pruned_dir")
    f.add_argument("--data", default="c4")
    f.add_argument("--steps", type=int, default=100)
    f.add_argument("--lr", type=float, default=1e-4)
    f.add_argument("--lora-r", type=int, default=8)
    f.add_argument("--lora-alpha", type=int, default=16)
    f.add_argument("--lora-dropout", type=float, default=0.05)
    f.add_argument("--targets", default="q_proj,v_proj")
    f.add_argument("--seqlen", type=int, default=1024)
    f.add_argument("--batch-size", type=int, default=4)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--mode", default="separate", choices=["separate", "merge", "masked-lora"],
                   help="separate adapter (default), merge + re-mask, or masked LoRA")
    f.add_argument("--merge", action="store_true", help="same as --mode merge")
    f.add_argument("--masked-lora", action="store_true", help="same as --mode masked-lora")
    f.add_argument("--eval", default="wikitext2")
    f.add_argument("--eval-seqlen", type=int, default=None)
    f.add_argument("--eval-max-windows", type=int, default=None)
    f.add_argument("--out", required=True)
    _common(f)

    q = sub.add_parser("quantize", help="quantize the surviving weights of a pruned model, zeros kept")
    q.add_argument("pruned_dir")
    q.add_argument("--bits", default="int4", help="int8 | int4")
    q.add_argument("--group-size", type=int, default=None, help="group size along inputs (default per channel)")
    q.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    q.add_argument("--nsamples", type=int, default=128)
    q.add_argument("--seqlen", type=int, default=2048)
    q.add_argument("--eval", default="wikitext2")
    q.add_argument("--eval-seqlen", type=int, default=None)
    q.add_argument("--eval-max-windows", type=int, default=None)
    q.add_argument("--out", required=True)
    _common(q)

    ls = sub.add_parser("ls", help="list model aliases, data sources, pruners, allocations, tasks")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--quiet", action="store_true")
    ls.add_argument("--config", default=None)
    ls.add_argument("--data-dir", default=None)
    return ap


# ------------------------------------------------------------------ tables
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
        out.append("")
        out.append(table(["task", "acc", "acc_norm"], [[t, v.get("acc"), v.get("acc_norm")] for t, v in rec["tasks"].items()]))
    return "\n".join(out)


def eval_summary(rec: dict) -> str:
    rows = [[k, v["ppl"], v["seqlen"], v["windows"], v["tokens"]] for k, v in rec["ppl_details"].items()]
    out = [table(["dataset", "ppl", "seqlen", "windows", "tokens"], rows)] if rows else []
    if rec.get("tasks"):
        out.append(table(["task", "acc", "acc_norm"], [[t, v.get("acc"), v.get("acc_norm")] for t, v in rec["tasks"].items()]))
        avg = rec.get("zero_shot", {}).get("average", {})
        if avg.get("acc") is not None:
            out.append(f"average ({avg['metric']}): {avg['acc']:.4f}")
    return "\n\n".join(out)


# ------------------------------------------------------------------ commands
def cmd_prune(a: argparse.Namespace) -> tuple[dict, str]:
    from layerprune.api import prune

    pk = {k: v for k, v in {"blocksize": a.blocksize, "percdamp": a.percdamp}.items() if v is not None}
    if a.pruner != "sparsegpt" and pk:
        raise UserError("--blocksize and --percdamp apply to --pruner sparsegpt only")
    rec = prune(a.model, a.sparsity, a.pruner, a.pattern, a.allocation, alloc_options(a.allocation, a), a.calib,
                a.nsamples, a.seqlen, a.seed, a.device, a.dtype, a.batch_size, a.offload, _csv(a.eval),
                a.eval_seqlen, a.eval_max_windows, out=a.out, progress=not a.quiet, use_cache=not a.no_cache,
                pruner_kwargs=pk, dense_ppl=a.dense_ppl, trust_remote_code=a.trust_remote_code,
                quantize=a.quantize, group_size=a.group_size, tasks=_csv(a.tasks), limit=a.limit)
    return rec, prune_summary(rec)


def cmd_allocate(a: argparse.Namespace) -> tuple[dict, str]:
    from layerprune.api import allocate

    rec = allocate(a.model, a.sparsity, a.allocation, alloc_options(a.allocation, a), a.pattern, a.pruner, a.calib,
                   a.nsamples, a.seqlen, a.seed, a.device, a.dtype, a.batch_size, a.offload,
                   progress=not a.quiet, use_cache=not a.no_cache, trust_remote_code=a.trust_remote_code)
    if a.plot:
        from layerprune.report import plot_ratios

        plot_ratios({a.allocation: rec["per_block"]}, a.plot, title=f"{rec['model']} — target {rec['target']}")
        rec["plot"] = a.plot
    rows = [[i, s] + ([rec["phi"][i]] if "phi" in rec else []) for i, s in enumerate(rec["per_block"])]
    hdr = ["block", "sparsity"] + (["phi"] if "phi" in rec else [])
    txt = table(hdr, rows) + f"\n\n{rec['method']}: target {rec['target']}, weighted mean " \
        f"{sum(s * n for s, n in zip(rec['per_block'], rec['block_sizes'])) / sum(rec['block_sizes']):.4f}"
    if "evaluations" in rec:
        txt += f", {rec['evaluations']} evaluations"
    return rec, txt


def cmd_eval(a: argparse.Namespace) -> tuple[dict, str]:
    from layerprune.api import evaluate

    tbs: int | str = a.task_batch_size if a.task_batch_size == "auto" else int(a.task_batch_size)
    rec = evaluate(a.model, _csv(a.ppl), a.seqlen, a.max_windows, _csv(a.tasks), a.limit, a.device, a.dtype,
                   a.batch_size, trust_remote_code=a.trust_remote_code, task_batch_size=tbs)
    return rec, eval_summary(rec)


def cmd_ls(a: argparse.Namespace) -> tuple[dict, str]:
    from layerprune.allocation import ALLOCATORS
    from layerprune.data.sources import SOURCES, data_dir
    from layerprune.evaluation.zeroshot import TASKS
    from layerprune.models.loading import ALIASES
    from layerprune.pruners import PRUNERS

    rec = {"models": {k: {"install": v.pip, "note": v.note} for k, v in ALIASES.items()},
           "datasets": {k: v.doc for k, v in SOURCES.items()}, "data_dir": str(data_dir()),
           "pruners": list(PRUNERS), "patterns": ["unstructured", "N:M (e.g. 2:4, 4:8)"],
           "allocations": list(ALLOCATORS), "tasks": list(TASKS)}
    txt = "\n".join([table(["alias", "note", "install"], [[k, v["note"], v["install"][:60]] for k, v in rec["models"].items()]),
                     "", table(["dataset", "description"], [[k, v] for k, v in rec["datasets"].items()]),
                     f"\ndata dir: {rec['data_dir']}",
                     f"pruners: {', '.join(rec['pruners'])}", f"allocations: {', '.join(rec['allocations'])}",
                     f"patterns: {', '.join(rec['patterns'])}", f"tasks: {', '.join(rec['tasks'])}"])
    return rec, txt


def _lazy(mod: str, fn: str) -> Callable[[argparse.Namespace], tuple[dict, str]]:
    def run(a: argparse.Namespace) -> tuple[dict, str]:
        return getattr(__import__(mod, fromlist=[fn]), fn)(a)

    return run


COMMANDS: dict[str, Callable[[argparse.Namespace], tuple[dict, str]]] = {
    "prune": cmd_prune, "allocate": cmd_allocate, "eval": cmd_eval, "ls": cmd_ls,
    "compare": _lazy("layerprune.compare", "cmd_compare"), "report": _lazy("layerprune.report", "cmd_report"),
    "finetune": _lazy("layerprune.finetune", "cmd_finetune"), "quantize": _lazy("layerprune.quantize", "cmd_quantize"),
}


def _apply_config(ap: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    a = ap.parse_args(argv)
    if getattr(a, "config", None):
        import yaml

        path = Path(a.config)
        if not path.is_file():
            raise UserError(f"--config {a.config} does not exist")
        cfg = yaml.safe_load(path.read_text()) or {}
        if not isinstance(cfg, dict):
            raise UserError(f"--config {a.config} must hold a mapping of flag names to values")
        sub = ap._subparsers._group_actions[0].choices[a.cmd]  # type: ignore[union-attr]
        known = {act.dest for act in sub._actions}
        bad = [k for k in cfg if k.replace("-", "_") not in known]
        if bad:
            raise UserError(f"--config has unknown keys {bad}: use the long flag names of `layerprune {a.cmd}`")
        sub.set_defaults(**{k.replace("-", "_"): v for k, v in cfg.items()})
        a = ap.parse_args(argv)
    return a


def main(argv: list[str] | None = None) -> int:
    from layerprune.utils import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    real_stdout = sys.stdout
    try:
        a = _apply_config(ap, argv)
    except UserError as e:
        print(f"layerprune: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse: usage errors are bad input
        return 2 if e.code not in (0, None) else 0
    setup_logging("WARNING" if a.quiet else "INFO")
    if a.quiet:
        import os

        os.environ["LAYERPRUNE_PROGRESS"] = "0"
    try:
        from layerprune.data.sources import set_data_dir

        set_data_dir(getattr(a, "data_dir", None))
        with contextlib.redirect_stdout(sys.stderr):  # stray prints from libraries never reach stdout
            rec, text = COMMANDS[a.cmd](a)
        from layerprune.distributed import is_main

        if not is_main():  # under torchrun only rank 0 reports
            return 0
        if a.json:
            real_stdout.write(json.dumps(rec, default=str) + "\n")
        else:
            real_stdout.write(text + "\n")
        real_stdout.flush()
        return 0
    except UserError as e:
        print(f"layerprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerprune: interrupted (a rerun with the same --out resumes)", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        print(f"layerprune: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
