"""2:4 weights: cuSPARSELt (``torch._cslt_compress`` / ``torch._cslt_sparse_mm``, the weight compressed once, the
algorithm searched once) against dense ``F.linear`` and layerprune's ops (delta, bitmask), side by side in one run,
median µs with the L2 flushed (``sparse_decode.timeit``). A correctness check against ``F.linear`` first.
``--graphs``: every variant captured once in a CUDA graph and its replay timed, so that the host's work per call
(cuSPARSELt's descriptors and plan are set up on every eager call) is out of the figure.

    python3 bench/probe_cslt.py --out $OUT/cslt.json [--graphs]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import format as bformat  # noqa: E402
from layerprune.sparse.delta import pack as dpack  # noqa: E402
from sparse_decode import DEV, brief, masked, op, shape_list, timeit, write_rows  # noqa: E402


def cslt_fn(w: torch.Tensor, x: torch.Tensor, form: str):
    wc = torch._cslt_compress(w)
    if form == "t":
        return lambda: torch._cslt_sparse_mm(wc, x.t(), transpose_result=True)
    if form == "search":
        alg = torch._cslt_sparse_mm_search(wc, x.t())
        return lambda: torch._cslt_sparse_mm(wc, x.t(), transpose_result=True, alg_id=alg)
    return lambda: torch._cslt_sparse_mm(wc, x.t()).t()


def timed_variant(row: dict, checks: list, name: str, make, ref: torch.Tensor, reps: int, wrap=lambda f: f,
                  **where) -> None:
    """``make()`` gives a variant's call: run once against ``ref`` (its largest error over ref's largest value goes to
    ``checks`` with ``where``), then timed into ``row[name + "_us"]`` (through ``wrap``, e.g. :func:`graphed`); a
    RuntimeError or TypeError (a form the library refuses) goes to ``row[name + "_error"]`` instead."""
    try:
        fn = make()
        y = fn()
        err = float((y.float() - ref).abs().max() / ref.abs().max())
        checks.append({**where, "rel_err": err, "ok": err < 1e-2})
        row[f"{name}_us"] = timeit(wrap(fn), reps)
    except (RuntimeError, TypeError) as e:
        row[f"{name}_error"] = str(e).splitlines()[0][:200]


def graphed(fn):
    """``fn`` captured in a CUDA graph (after a warm-up on a side stream); returns the replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x4096,1024x4096,11008x4096,4096x11008,14336x4096,8192x8192,28672x8192,8192x28672")
    ap.add_argument("--batches", default="1,4,16,32,64,128,512,2048")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--graphs", action="store_true")
    a = ap.parse_args()
    wrap = graphed if a.graphs else (lambda fn: fn)
    print("cusparselt", torch.backends.cusparselt.is_available(), torch.backends.cusparselt.version(), flush=True)
    checks, rows = [], []
    for n, k in shape_list(a.shapes):
        w = masked(n, k, "2:4")
        sb, sd = bformat.pack(w), dpack(w)
        for b in (int(v) for v in a.batches.split(",")):
            x = torch.randn(b, k, device=DEV, dtype=torch.bfloat16)
            ref = F.linear(x.float(), w.float())
            row = {"shape": [n, k], "sparsity": "2:4", "batch": b,
                   "graphs": a.graphs,
                   "dense_us": timeit(wrap(lambda: F.linear(x, w)), a.reps),
                   "delta_op_us": timeit(wrap(lambda: op(x, sd, n, k)), a.reps),
                   "bitmask_op_us": timeit(wrap(lambda: op(x, sb, n, k)), a.reps)}
            for form in ("plain", "t", "search"):
                timed_variant(row, checks, f"cslt_{form}", lambda form=form: cslt_fn(w, x, form), ref, a.reps, wrap,
                              shape=[n, k], batch=b, form=form)
            rows.append(row)
            brief(row, "shape", "batch", "dense_us", "delta_op_us", "bitmask_op_us", "cslt_plain_us", "cslt_t_us",
                  "cslt_search_us", "cslt_plain_error", "cslt_t_error", "cslt_search_error")
            write_rows(a.out, checks=checks, linears=rows)
    print("correct:", all(c["ok"] for c in checks), flush=True)


if __name__ == "__main__":
    main()
