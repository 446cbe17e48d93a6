"""Command handlers: parsed arguments → one library call → (JSON record, terminal text).

No algorithm lives here; each handler maps flags onto the library's keyword arguments and configs.
"""

from __future__ import annotations

import argparse
from typing import Callable

from layerprune.cli import check_pruner_flags, csv_list, options_for
from layerprune.cli.tables import allocate_summary, eval_summary, prune_summary, table
from layerprune.errors import UserError

Handler = Callable[[argparse.Namespace], tuple[dict, str]]


def _calib(a: argparse.Namespace):
    from layerprune.api import CalibConfig

    return CalibConfig(a.calib, a.nsamples, a.seqlen, a.seed, a.batch_size, a.offload).validate()


def _methods(a: argparse.Namespace, allocation: str, pruner: str) -> tuple[dict, dict]:
    from layerprune.allocation import get_allocator
    from layerprune.pruners import get_pruner

    check_pruner_flags([pruner], a)
    return options_for(get_allocator(allocation), a), options_for(get_pruner(pruner), a)


def cmd_prune(a: argparse.Namespace) -> tuple[dict, str]:
    from layerprune.api import EvalConfig, prune

    ao, po = _methods(a, a.allocation, a.pruner)
    ev = EvalConfig(datasets=tuple(csv_list(a.eval)), seqlen=a.eval_seqlen, max_windows=a.eval_max_windows,
                    batch_size=a.eval_batch_size, tasks=tuple(csv_list(a.tasks)), limit=a.limit,
                    task_batch_size=a.task_batch_size)
    if a.sparse_out:
        from layerprune.sparse.export import check_sparse_out

        check_sparse_out(a.sparse_out, a.out)
    rec = prune(a.model, sparsity=a.sparsity, pruner=a.pruner, pattern=a.pattern, allocation=a.allocation,
                alloc_options=ao, pruner_options=po, calib=_calib(a), evaluation=ev, device=a.device, dtype=a.dtype,
                out=a.out, progress=not a.quiet, use_cache=not a.no_cache, dense_ppl=a.dense_ppl,
                trust_remote_code=a.trust_remote_code, quantize=a.quantize, group_size=a.group_size,
                allow_long=a.yes, data_dir=a.data_dir, stream=a.stream)
    if a.sparse_out:
        from layerprune.sparse.export import export_sparse

        rec["sparse_out"] = export_sparse(a.out, a.sparse_out, layout=a.sparse_layout, progress=not a.quiet,
                                          device=a.device)["out"]
    return rec, prune_summary(rec)


def cmd_allocate(a: argparse.Namespace) -> tuple[dict, str]:
    from layerprune.api import allocate

    ao, po = _methods(a, a.allocation, a.pruner)
    rec = allocate(a.model, sparsity=a.sparsity, allocation=a.allocation, options=ao, pattern=a.pattern,
                   pruner=a.pruner, pruner_options=po, calib=_calib(a), device=a.device, dtype=a.dtype,
                   progress=not a.quiet, use_cache=not a.no_cache, trust_remote_code=a.trust_remote_code,
                   allow_long=a.yes, data_dir=a.data_dir)
    if a.plot:
        from layerprune.report import plot_ratios

        plot_ratios({a.allocation: rec["per_block"]}, a.plot, title=f"{rec['model']} — target {rec['target']}")
        rec["plot"] = a.plot
    return rec, allocate_summary(rec)


def cmd_eval(a: argparse.Namespace) -> tuple[dict, str]:
    from layerprune.api import evaluate

    rec = evaluate(a.model, ppl=None if a.ppl is None else csv_list(a.ppl), seqlen=a.seqlen,
                   max_windows=a.max_windows, tasks=csv_list(a.tasks), limit=a.limit, device=a.device, dtype=a.dtype,
                   batch_size=a.batch_size, trust_remote_code=a.trust_remote_code, task_batch_size=a.task_batch_size,
                   data_dir=a.data_dir)
    return rec, eval_summary(rec)


def cmd_compare(a: argparse.Namespace) -> tuple[dict, str]:
    from pathlib import Path

    from layerprune.allocation import get_allocator
    from layerprune.api import EvalConfig
    from layerprune.compare import parse_sparsities, run_grid
    from layerprune.pruners import get_pruner

    allocs, pruners = csv_list(a.allocations), csv_list(a.pruners)
    if not allocs or not pruners:
        raise UserError("--allocations and --pruners must each name at least one method")
    check_pruner_flags(pruners, a)
    ev = EvalConfig(datasets=tuple(csv_list(a.ppl)), seqlen=a.eval_seqlen, max_windows=a.eval_max_windows,
                    batch_size=a.eval_batch_size, tasks=tuple(csv_list(a.tasks)), limit=a.limit,
                    task_batch_size=a.task_batch_size)
    try:
        seeds = [int(x) for x in csv_list(a.seeds)] if a.seeds else None
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, e.g. 0,1,2 (got {a.seeds!r})") from None
    summary = run_grid(a.model, a.out, allocs, pruners, parse_sparsities(a.sparsities, a.pattern), a.pattern,
                       alloc_options=lambda n: options_for(get_allocator(n), a),
                       pruner_options=lambda n: options_for(get_pruner(n), a), calib=_calib(a), evaluation=ev,
                       device=a.device, dtype=a.dtype, trust_remote_code=a.trust_remote_code, progress=not a.quiet,
                       use_cache=not a.no_cache, allow_long=a.yes, data_dir=a.data_dir, render=table, seeds=seeds)
    text = (Path(a.out) / "results.md").read_text() + \
        f"\n{summary['runs']} runs in {a.out} ({summary['skipped']} already finished, skipped)"
    return summary, text


def cmd_report(a: argparse.Namespace) -> tuple[dict, str]:
    from layerprune.report import write_report

    rec = write_report(a.dir)
    return rec, f"wrote {rec['report']}"


def cmd_finetune(a: argparse.Namespace) -> tuple[dict, str]:
    from layerprune.api import EvalConfig
    from layerprune.finetune import finetune_dir

    mode = "merge" if a.merge else "masked-lora" if a.masked_lora else a.mode
    ev = EvalConfig(datasets=tuple(csv_list(a.eval)), seqlen=a.eval_seqlen, max_windows=a.eval_max_windows)
    rec = finetune_dir(a.pruned_dir, a.out, steps=a.steps, lr=a.lr, r=a.lora_r, alpha=a.lora_alpha,
                       dropout=a.lora_dropout, targets=csv_list(a.targets), seqlen=a.seqlen, batch_size=a.batch_size,
                       seed=a.seed, mode=mode, data=a.data, evaluation=ev, device=a.device, progress=not a.quiet,
                       trust_remote_code=a.trust_remote_code, data_dir=a.data_dir)
    ft = rec["finetune"]
    rows = [["pruned", rec["sparsity_before"]] + list(rec["ppl_before_finetune"].values()),
            [f"+ LoRA ({mode}, {a.steps} steps)", rec["sparsity_after"]] + list(rec["ppl"].values())]
    txt = table(["model", "sparsity"] + [f"ppl {k}" for k in rec["ppl"]], rows)
    txt += (f"\nloss (mean of 5 steps) {ft['loss_first5_mean']:.3f} → {ft['loss_last5_mean']:.3f} over "
            f"{ft['tokens']} tokens; saved to {rec['out']}")
    return rec, txt


def cmd_quantize(a: argparse.Namespace) -> tuple[dict, str]:
    from layerprune.api import EvalConfig
    from layerprune.quantize import quantize_dir

    ev = EvalConfig(datasets=tuple(csv_list(a.eval)), seqlen=a.eval_seqlen or a.seqlen, max_windows=a.eval_max_windows)
    rec = quantize_dir(a.pruned_dir, a.out, a.bits, a.group_size, a.method, ev, a.device, a.trust_remote_code,
                       a.data_dir)
    q = rec["quantization"]
    txt = table(["", "sparsity"] + [f"ppl {k}" for k in rec["ppl"]],
                [["pruned", rec["sparsity_before"]] + list(rec["ppl_before_quantization"].values()),
                 [f"+ {a.bits} g{a.group_size or 'row'}", rec["sparsity_after"]] + list(rec["ppl"].values())])
    txt += (f"\nsize: dense {q['size']['dense_bytes'] / 2**20:.1f} MiB → bitmask+{a.bits} "
            f"{q['size']['sparse_quantized_bytes'] / 2**20:.1f} MiB")
    return rec, txt


def _other_layouts(rec: dict) -> str:
    """", 3 linears in delta": the packed linears that took another layout than the one asked for (nm24 → delta)."""
    from collections import Counter

    other = Counter(lr["layout"] for lr in rec["layers"].values() if lr.get("layout", rec["layout"]) != rec["layout"])
    return "".join(f", {k} linear{'s' if k > 1 else ''} in {lay}" for lay, k in sorted(other.items()))


def cmd_export(a: argparse.Namespace) -> tuple[dict, str]:
    from layerprune.sparse.export import export_sparse

    rec = export_sparse(a.pruned_dir, a.out, min_sparsity=a.min_sparsity, progress=not a.quiet, layout=a.layout,
                        device=a.device)
    rows = [[n, lr["sparsity"], lr["format"] + (f" ({lr['layout']})" if "layout" in lr else ""), lr["bytes"]]
            for n, lr in list(rec["layers"].items())[:12]]
    txt = table(["linear", "sparsity", "format", "bytes"], rows)
    if len(rec["layers"]) > 12:
        txt += f"\n… {len(rec['layers']) - 12} more linears"
    s = rec["size"]
    txt += (f"\n\n{rec['sparse_layers']} of {len(rec['layers'])} linears compressed; linear weights "
            f"{s['dense_bytes'] / 2**20:.1f} MiB dense → {s['sparse_bytes'] / 2**20:.1f} MiB ({s['ratio']:.3f}, "
            f"{rec['layout']} layout{_other_layouts(rec)}); "
            f"saved to {rec['out']}")
    return rec, txt


def cmd_generate(a: argparse.Namespace) -> tuple[dict, str]:
    from layerprune.sparse.runtime import generate

    rec = generate(a.model, a.prompt, a.max_new_tokens, device=a.device, dtype=a.dtype,
                   trust_remote_code=a.trust_remote_code, merge=not a.no_merge, graphs=not a.no_graphs)
    return rec, rec["text"]


def cmd_bench_decode(a: argparse.Namespace) -> tuple[dict, str]:
    from layerprune.sparse.bench import bench_decode

    try:
        bss = [int(x) for x in csv_list(a.batch_sizes)]
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, e.g. 1,4,16 (got {a.batch_sizes!r})") from None
    try:
        pts = None if a.prefill_tokens is None else [int(x) for x in csv_list(a.prefill_tokens)]
    except ValueError:
        raise UserError(f"--prefill-tokens must be comma-separated integers, e.g. 512,2048 (got {a.prefill_tokens!r})") from None
    rec = bench_decode(a.model, bss, a.new_tokens, a.prompt_len, device=a.device, dtype=a.dtype,
                       graphs=not a.no_graphs, layout=a.layout, compile=a.compile, merge=not a.no_merge,
                       prefill_tokens=pts)
    merged = rec["merged_groups"] > 0
    rows = [[r["batch"], r["dense_tok_s"], *([r["dense_merged_tok_s"]] if merged else []), r["sparse_tok_s"],
             r["speedup"], *([r["speedup_vs_dense_merged"]] if merged else [])] for r in rec["rows"]]
    head = (["batch", "dense tok/s", "dense merged tok/s", "sparse tok/s", "speed-up", "vs dense merged"] if merged
            else ["batch", "dense tok/s", "sparse tok/s", "speed-up"])
    txt = table(head, rows)
    txt += f"\n\n{rec['device']}, {rec['dtype']}, {rec['mode']}; weights on the GPU: dense " \
           f"{rec['dense_weight_bytes'] / 2**20:.1f} MiB, sparse {rec['sparse_weight_bytes'] / 2**20:.1f} MiB"
    if rec["prefill"]:
        pre = [[r["tokens"], r["dense_ms"], *([r["dense_merged_ms"]] if merged else []), r["sparse_ms"], r["speedup"],
                *([r["speedup_vs_dense_merged"]] if merged else [])] for r in rec["prefill"]]
        txt += "\n\nprefill of one sequence (time to the first token, eager; the sparse linears unpack for cuBLAS):\n"
        txt += table(["tokens", "dense ms", "dense merged ms", "sparse ms", "speed-up", "vs dense merged"] if merged
                     else ["tokens", "dense ms", "sparse ms", "speed-up"], pre)
    if merged:
        txt += (f"\nsparse model: {rec['merged_groups']} groups of linears that read one input run stacked (q/k/v, "
                "gate/up; --no-merge to keep them apart); 'dense merged' is the dense model stacked the same way")
    return rec, txt


def cmd_ls(a: argparse.Namespace) -> tuple[dict, str]:
    from layerprune.allocation import ALLOCATORS
    from layerprune.data.sources import SOURCES, data_dir
    from layerprune.evaluation.zeroshot import TASKS
    from layerprune.models.loading import ALIASES
    from layerprune.pruners import PRUNERS

    rec = {"models": {k: {"install": v.pip, "note": v.note} for k, v in ALIASES.items()},
           "datasets": {k: v.doc for k, v in SOURCES.items()}, "data_dir": str(data_dir(a.data_dir)),
           "pruners": list(PRUNERS), "patterns": ["unstructured", "N:M (e.g. 2:4, 4:8)"],
           "allocations": list(ALLOCATORS), "tasks": list(TASKS),
           "methods": {s.name: {"kind": s.kind, "doc": s.doc} for s in [*PRUNERS.values(), *ALLOCATORS.values()]}}
    txt = "\n".join([table(["alias", "note", "install"], [[k, v["note"], v["install"][:60]] for k, v in rec["models"].items()]),
                     "", table(["dataset", "description"], [[k, v] for k, v in rec["datasets"].items()]),
                     "", table(["method", "kind", "what"], [[k, v["kind"], v["doc"]] for k, v in rec["methods"].items()]),
                     f"\ndata dir: {rec['data_dir']}",
                     f"pruners: {', '.join(rec['pruners'])}", f"allocations: {', '.join(rec['allocations'])}",
                     f"patterns: {', '.join(rec['patterns'])}", f"tasks: {', '.join(rec['tasks'])}"])
    return rec, txt


COMMANDS: dict[str, Handler] = {
    "prune": cmd_prune, "allocate": cmd_allocate, "eval": cmd_eval, "ls": cmd_ls, "compare": cmd_compare,
    "report": cmd_report, "finetune": cmd_finetune, "quantize": cmd_quantize, "export": cmd_export,
    "generate": cmd_generate, "bench-decode": cmd_bench_decode,
}
