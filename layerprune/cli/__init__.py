"""Command line: ``layerprune {prune,allocate,eval,compare,report,finetune,quantize,export,generate,bench-decode,ls}``.

Contract (other tools rely on it): ``--json`` prints exactly one JSON object on stdout, everything
else (logs, progress) goes to stderr; exit 0 on success, 2 on bad input (one line naming the fix),
1 on any other failure. The method flags (``--alpha``, ``--blocksize`` …) are generated from the
registered specs' option dataclasses (:mod:`layerprune.options`); handlers live in
:mod:`layerprune.cli.commands`, tables in :mod:`layerprune.cli.tables`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Any

from layerprune.errors import RunFailure, UserError

log = logging.getLogger("layerprune")


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (a ``UserError``), not a 25-line usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def csv_list(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _common(p: argparse.ArgumentParser, dtype: str = "float32",
            dtype_help: str = "float32 | bfloat16 | float16 (default float32)") -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    p.add_argument("--dtype", default=dtype, help=dtype_help)
    _meta(p)
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.add_argument("--no-fused-kernels", action="store_true",
                   help="run RMSNorm and the rotary embedding as the model's own PyTorch code on the GPU "
                        "(default: layerprune's fused Triton kernels, checked against it on first use)")


def _meta(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="local data directory (default $LAYERPRUNE_DATA)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--config", default=None, help="YAML file whose keys (long flag names) set defaults for these flags")


def _calib(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="c4", help="calibration source (default c4)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="calibration window length (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per block forward (default 8)")
    p.add_argument("--offload", default="auto", choices=["auto", "cpu", "device"],
                   help="where calibration activations live (default: on the GPU if they fit)")
    p.add_argument("--no-cache", action="store_true", help="recompute dense statistics and ratios")


def _dest(flag: str) -> str:
    return "opt_" + flag.lstrip("-").replace("-", "_")


def method_flags(specs: dict) -> dict[str, tuple[str, type, Any, list[str]]]:
    """Every CLI option field of the registered specs, by flag: (help, type, choices, method names).
    Methods that declare the same flag share it (their types must agree)."""
    from layerprune.options import field_type, flag_of

    out: dict[str, tuple[str, type, Any, list[str]]] = {}
    for name, spec in specs.items():
        for f in fields(spec.options):
            if not f.metadata.get("cli", True):
                continue
            flag, t = flag_of(f), field_type(spec.options, f)
            help_ = f"{f.metadata.get('help', '')} (default {f.default})"
            if flag in out:
                h, t0, ch, who = out[flag]
                if t0 is not t:
                    raise RuntimeError(f"{flag} is declared as {t0.__name__} and {t.__name__} by different methods")
                out[flag] = (h, t0, ch, who + [name])
            else:
                out[flag] = (help_, t, f.metadata.get("choices"), [name])
    return out


def _method_args(p: argparse.ArgumentParser, title: str, specs: dict) -> None:
    g = p.add_argument_group(title)
    for flag, (help_, t, choices, who) in method_flags(specs).items():
        h = f"[{', '.join(who)}] {help_}".replace("%", "%%")  # argparse formats help strings with %
        if t is bool:
            g.add_argument(flag, dest=_dest(flag), action=argparse.BooleanOptionalAction, default=None, help=h)
        else:
            g.add_argument(flag, dest=_dest(flag), type=t, default=None, choices=list(choices) if choices else None,
                           help=h)


def options_for(spec, a: argparse.Namespace) -> dict:
    """The option values given on the command line for one method (unset flags keep the declared default)."""
    from layerprune.options import flag_of

    mine = {flag_of(f): f.name for f in fields(spec.options) if f.metadata.get("cli", True)}
    return {name: getattr(a, _dest(flag)) for flag, name in mine.items() if getattr(a, _dest(flag), None) is not None}


def check_pruner_flags(pruners: list[str], a: argparse.Namespace) -> None:
    """A pruner flag that none of the chosen pruners declares (``--blocksize`` with wanda) is bad input."""
    from layerprune.pruners import PRUNERS

    for flag, (_, _, _, who) in method_flags(PRUNERS).items():
        if getattr(a, _dest(flag), None) is not None and not set(who) & set(pruners):
            raise UserError(f"{flag} applies to --pruner {' / '.join(who)} only")


def _run_args(p: argparse.ArgumentParser) -> None:
    """What every command that calibrates and allocates takes: calibration, the methods' options, the common flags."""
    from layerprune.allocation import ALLOCATORS
    from layerprune.pruners import PRUNERS

    p.add_argument("--yes", action="store_true", help="run an allocation estimated to take over an hour")
    _calib(p)
    _method_args(p, "pruner options", PRUNERS)
    _method_args(p, "allocation options (each method reads its own)", ALLOCATORS)
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    from layerprune.allocation import ALLOCATORS
    from layerprune.pruners import PRUNERS

    ap = Parser(prog="layerprune", description="Post-training LLM pruning with per-layer sparsity.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    allocs, prs = ", ".join(ALLOCATORS), ", ".join(PRUNERS)

    p = sub.add_parser("prune", help="prune a model (allocate, prune block by block, evaluate, export)",
                       description="Prune, then evaluate WikiText-2 perplexity (--eval) and export with --out.")
    p.add_argument("model")
    p.add_argument("--sparsity", type=float, default=None, help="target sparsity in [0, 1) (e.g. 0.7)")
    p.add_argument("--pruner", default="wanda", help=f"{prs} (default wanda)")
    p.add_argument("--pattern", default="unstructured", help="unstructured | N:M, e.g. 2:4 (default unstructured)")
    p.add_argument("--allocation", default="uniform", help=f"{allocs} (default uniform)")
    p.add_argument("--eval", default="wikitext2", help="perplexity datasets after pruning, comma separated ('' for none)")
    p.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window (default --seqlen)")
    p.add_argument("--eval-max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--eval-batch-size", type=int, default=1,
                   help="windows per forward in the perplexity pass (default 1; the same perplexity up to float "
                        "rounding, faster on a GPU)")
    p.add_argument("--dense-ppl", action="store_true", help="also evaluate the dense model first")
    p.add_argument("--tasks", default="", help="zero-shot tasks after pruning (lm-eval), comma separated")
    p.add_argument("--limit", type=int, default=None, help="documents per zero-shot task")
    p.add_argument("--task-batch-size", default="16", help="lm-eval batch size (an integer or auto)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"], help="quantize surviving weights after pruning")
    p.add_argument("--group-size", type=int, default=None, help="quantization group size (default per channel)")
    p.add_argument("--out", default=None, help="write the pruned model + layerprune.json here (resumable)")
    p.add_argument("--sparse-out", default=None,
                   help="also write the compressed sparse model (layerprune export --format sparse) here")
    p.add_argument("--sparse-layout", default="delta", choices=["delta", "bitmask", "nm24"],
                   help="layout of --sparse-out (see export --layout)")
    p.add_argument("--stream", action="store_true",
                   help="never hold the whole model in host memory: read each block from the local safetensors "
                        "when it is pruned, write it to --out, evaluate block by block (uniform/dlp/owl/svnup; "
                        "the SV game keeps its pruned copies on disk)")
    _run_args(p)

    a = sub.add_parser("allocate", help="compute per-block sparsities of one allocation method",
                       description="Allocation only: no pruning, no evaluation.")
    a.add_argument("model")
    a.add_argument("--allocation", default="dlp", help=f"{allocs} (default dlp)")
    a.add_argument("--sparsity", type=float, default=0.7)
    a.add_argument("--pattern", default="unstructured")
    a.add_argument("--pruner", default="sparsegpt", help="base pruner inside the SV-NUP game (default sparsegpt)")
    a.add_argument("--plot", default=None, help="write a PNG of the per-block ratios")
    _run_args(a)

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model",
                       description="By default WikiText-2 perplexity; with --tasks and no --ppl only the tasks run.")
    e.add_argument("model", help="model spec, layerprune output directory, or sparse directory")
    e.add_argument("--ppl", default=None, help="datasets, comma separated: wikitext2,c4,ptb (default wikitext2, "
                                               "or none when --tasks is given; '' for none)")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward (perplexity)")
    e.add_argument("--tasks", default="", help="zero-shot tasks (lm-eval), comma separated")
    e.add_argument("--limit", type=int, default=None, help="documents per zero-shot task")
    e.add_argument("--task-batch-size", default="16", help="lm-eval batch size")
    _common(e)

    c = sub.add_parser("compare", help="run a grid of (allocation, pruner, sparsity) and write tables",
                       description="Every cell prunes and evaluates --ppl (default wikitext2); resumable.")
    c.add_argument("model")
    c.add_argument("--allocations", default="uniform,dlp")
    c.add_argument("--pruners", default="wanda")
    c.add_argument("--sparsities", default="0.5")
    c.add_argument("--pattern", default="unstructured")
    c.add_argument("--ppl", default="wikitext2")
    c.add_argument("--eval-seqlen", type=int, default=None)
    c.add_argument("--eval-max-windows", type=int, default=None)
    c.add_argument("--tasks", default="")
    c.add_argument("--limit", type=int, default=None, help="documents per zero-shot task")
    c.add_argument("--task-batch-size", default="16", help="lm-eval batch size (an integer or auto)")
    c.add_argument("--eval-batch-size", type=int, default=1, help="windows per forward in the perplexity pass")
    c.add_argument("--out", required=True)
    c.add_argument("--seeds", default=None, help="calibration seeds, comma separated (e.g. 0,1,2): every cell runs "
                                                 "per seed and the tables report mean ± std (default: --seed)")
    _run_args(c)

    r = sub.add_parser("report", help="turn a compare results directory into one HTML page")
    r.add_argument("dir")
    _meta(r)

    f = sub.add_parser("finetune", help="LoRA recovery fine-tuning that keeps the sparsity",
                       description="Evaluates --eval (default wikitext2) before and after.")
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

    q = sub.add_parser("quantize", help="quantize the surviving weights of a pruned model, zeros kept",
                       description="Evaluates --eval (default wikitext2) before and after.")
    q.add_argument("pruned_dir")
    q.add_argument("--bits", default="int4", help="int8 | int4")
    q.add_argument("--group-size", type=int, default=None, help="group size along inputs (default per channel)")
    q.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    q.add_argument("--seqlen", type=int, default=2048)
    q.add_argument("--eval", default="wikitext2")
    q.add_argument("--eval-seqlen", type=int, default=None)
    q.add_argument("--eval-max-windows", type=int, default=None)
    q.add_argument("--out", required=True)
    _common(q)

    x = sub.add_parser("export", help="write a pruned model in the compressed sparse format (SparseLinear)")
    x.add_argument("pruned_dir", help="a layerprune output directory (prune --out)")
    x.add_argument("--format", default="sparse", choices=["sparse"], help="sparse: packed nonzeros (SparseLinear)")
    x.add_argument("--layout", default="delta", choices=["delta", "bitmask", "nm24"],
                   help="delta: values + 4-bit column deltas, fastest decode (default); bitmask: bitmask + values, "
                        "faster prefill; nm24: 2:4 linears on the sparse tensor cores (the others in delta) "
                        "(BENCHMARKS.md 'Sparse inference')")
    x.add_argument("--min-sparsity", type=float, default=None,
                   help="layers below this sparsity stay dense (default: the measured break-even, see BENCHMARKS.md)")
    x.add_argument("--out", required=True)
    x.add_argument("--device", default="auto",
                   help="where each linear is packed: auto (a GPU when there is one) | cpu | cuda[:N]; the output is "
                        "the same bit for bit")
    _meta(x)

    g = sub.add_parser("generate", help="greedy generation from a model or a sparse directory")
    g.add_argument("model")
    g.add_argument("--prompt", default="The capital of France is")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--no-graphs", action="store_true",
                   help="transformers' generate with eager steps; by default, on a GPU, greedy decoding runs with a "
                        "static KV cache and its step replayed from a CUDA graph (layerprune/sparse/runtime.py)")
    g.add_argument("--no-merge", action="store_true",
                   help="keep q/k/v and gate/up as separate linears (by default the sparse model runs the linears that "
                        "read one input as one stacked linear: fewer, taller launches; layerprune/sparse/merge.py)")
    _common(g, "auto", "auto | float32 | bfloat16 | float16 (default auto: bfloat16 on a GPU, where the sparse kernels "
                       "run, float32 on the CPU)")

    b = sub.add_parser("bench-decode", help="decode tokens/s, dense vs sparse, with a static KV cache and CUDA graphs")
    b.add_argument("model", help="a sparse directory (export --format sparse) or a layerprune output directory")
    b.add_argument("--batch-sizes", default="1,4,16")
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--prompt-len", type=int, default=32)
    b.add_argument("--prefill-tokens", default=None,
                   help="also time the prefill (time to the first token) of one sequence of each of these lengths, "
                        "dense vs sparse (default 2048, or the model's longest context when shorter; '' for none)")
    b.add_argument("--no-graphs", action="store_true", help="plain eager decode steps (no CUDA graphs)")
    b.add_argument("--compile", action="store_true",
                   help="compile each decode step with torch.compile first (fuses the model's elementwise ops; "
                        "tens of seconds of compilation per model and batch size, untimed)")
    b.add_argument("--layout", default="delta", choices=["delta", "bitmask", "nm24"],
                   help="layout used when MODEL is a prune --out directory (a sparse directory keeps its own)")
    b.add_argument("--no-merge", action="store_true",
                   help="keep q/k/v and gate/up as separate linears (by default the sparse model runs the linears that "
                        "read one input as one stacked linear: fewer, taller launches; layerprune/sparse/merge.py)")
    _common(b)

    ls = sub.add_parser("ls", help="list model aliases, data sources, pruners, allocations, tasks")
    _meta(ls)
    return ap


def _config_value(act: argparse.Action, key: str, v: Any) -> Any:
    """A YAML value for a flag, type-checked as the command line would check it."""
    if isinstance(v, (list, dict)):
        raise UserError(f"--config: '{key}' must be a single value, not {type(v).__name__} {v!r}")
    if isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(v, bool):
            raise UserError(f"--config: '{key}' must be true or false (got {v!r})")
        return v
    if v is None:
        return None
    if act.type is not None:
        try:
            if isinstance(v, bool):
                raise ValueError
            v = act.type(v)
        except (TypeError, ValueError):
            raise UserError(f"--config: '{key}' must be a {getattr(act.type, '__name__', 'value')} (got {v!r})") from None
    if act.choices is not None and v not in act.choices:
        raise UserError(f"--config: '{key}' must be one of {', '.join(map(str, act.choices))} (got {v!r})")
    return v


def parse(argv: list[str]) -> argparse.Namespace:
    ap = build_parser()
    if not argv:
        raise UserError("no command given: try `layerprune --help`")
    a = ap.parse_args(argv)
    if getattr(a, "config", None):
        import yaml

        path = Path(a.config)
        if not path.is_file():
            raise UserError(f"--config {a.config} does not exist")
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise UserError(f"--config {a.config} is not a text file: give a YAML file of flag: value lines") from None
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1})" if where is not None else ""
            raise UserError(f"--config {a.config} is not valid YAML{at}: fix it or give a mapping of flag: value") from None
        if not isinstance(cfg, dict):
            raise UserError(f"--config {a.config} must hold a mapping of flag names to values")
        sub = ap._subparsers._group_actions[0].choices[a.cmd]  # type: ignore[union-attr]
        by_flag = {s: act for act in sub._actions for s in act.option_strings}
        defaults = {}
        for k, v in cfg.items():
            act = by_flag.get("--" + str(k).replace("_", "-")) or by_flag.get("--" + str(k))
            if act is None:
                raise UserError(f"--config has unknown key '{k}': use the long flag names of `layerprune {a.cmd}`")
            defaults[act.dest] = _config_value(act, str(k), v)
        sub.set_defaults(**defaults)
        a = ap.parse_args(argv)
    return a


def _quiet_libraries(quiet: bool) -> None:
    """transformers' own loading lines and progress bars would precede our one-line errors: keep them off
    (our progress bars report the long steps; ``--quiet`` turns those off too)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    if quiet:
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        except ImportError:  # pragma: no cover
            pass


_HELPERS: list = []  # helper processes this command started (subprocess.Popen), reaped before it exits


def _reap_helpers() -> None:
    """Stop and reap the helper processes (a warm-up still compiling when the command ends is of no more use),
    and drop a preload the command did not take (it failed before loading)."""
    preload = sys.modules.get("layerprune.models.preload")
    if preload is not None:
        preload.discard()
    while _HELPERS:
        p = _HELPERS.pop()
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


def _start_preload(a: argparse.Namespace) -> None:
    """Start compiling the fused kernels for a local checkpoint in a helper process
    (:func:`engine.fused.warm_up_process`), reading its weights onto the GPU (:mod:`layerprune.models.preload`)
    and warming cuBLAS and attention for its block shapes (:func:`engine.warm.start`), all before transformers
    is imported; any problem here is left for the load itself to report."""
    try:
        from layerprune.engine import fused
        from layerprune.models import preload
        from layerprune.models.loading import parse_dtype
        from layerprune.utils import resolve_device

        dtype, device = parse_dtype(a.dtype), resolve_device(a.device)
        cfg = Path(a.model).expanduser() / "config.json"
        if cfg.is_file() and device.type == "cuda":
            _HELPERS.append(fused.warm_up_process(str(cfg), dtype, device))
        pending = preload.start(a.model, dtype, device)
        if pending is not None:
            from layerprune.engine import warm

            warm.start(cfg, dtype, device, min(a.batch_size, a.nsamples) * a.seqlen, a.seqlen, after=pending.placed)
    except Exception as e:  # noqa: BLE001
        logging.getLogger("layerprune").debug("no preload (%s)", e)


def main(argv: list[str] | None = None) -> int:
    from layerprune.utils import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    real_stdout = sys.stdout
    try:
        a = parse(argv)
    except UserError as e:
        print(f"layerprune: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return 2 if e.code not in (0, None) else 0
    setup_logging("WARNING" if a.quiet else "INFO")
    if getattr(a, "no_fused_kernels", False):
        from layerprune.engine import fused

        fused.ENABLED = False
    from layerprune.cli.commands import COMMANDS

    if a.cmd == "prune" and not a.stream:
        _start_preload(a)
    try:
        _quiet_libraries(a.quiet)
        with contextlib.redirect_stdout(sys.stderr):  # stray prints from libraries never reach stdout
            rec, text = COMMANDS[a.cmd](a)
        from layerprune.distributed import is_main

        if not is_main():  # under torchrun only rank 0 reports
            return 0
        real_stdout.write((json.dumps(rec, default=str) if a.json else text) + "\n")
        real_stdout.flush()
        return 0
    except UserError as e:
        print(f"layerprune: error: {e}", file=sys.stderr)
        return 2
    except RunFailure as e:
        print(f"layerprune: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        resumable = a.cmd in ("prune", "finetune", "quantize") and getattr(a, "out", None)
        print("layerprune: interrupted" + (f" (rerun the same command to resume into {a.out})" if resumable and a.cmd == "prune"
                                           else ""), file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001
        from layerprune.distributed import explain_failure

        why = explain_failure(e)  # a failed or timed-out collective: one line, no traceback from inside torch
        if why is None:
            traceback.print_exc(file=sys.stderr)
        print(f"layerprune: failed: {why or f'{type(e).__name__}: {e}'}", file=sys.stderr)
        return 1
    finally:
        _reap_helpers()


def _has_children() -> bool:
    """Whether this process has live child processes (Linux ``/proc``; True when that cannot be read)."""
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                if f.read().strip():
                    return True
        return False
    except OSError:
        return True


def run() -> None:
    """The process entry point (the ``layerprune`` script, ``python -m layerprune`` / ``layerprune.cli``):
    :func:`main`, then a fast exit. Every file a command writes is closed (and renamed into place) before
    ``main`` returns, and the output streams and log handlers are flushed here; what is skipped is the
    interpreter's teardown of torch and transformers, 1–2.4 s of every run on a 2-core machine (BENCHMARKS.md,
    "Fixed costs"). A process with live child processes (``torch.compile``'s workers), one where that cannot be
    told (no Linux ``/proc``), and any run with ``LAYERPRUNE_NORMAL_EXIT=1`` exit normally."""
    import layerprune
    from layerprune import api

    api.STARTED_AT = layerprune.IMPORTED_AT  # the run record's startup_seconds
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    if _has_children() or os.environ.get("LAYERPRUNE_NORMAL_EXIT"):
        sys.exit(rc)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass
    os._exit(rc)


if __name__ == "__main__":
    run()
