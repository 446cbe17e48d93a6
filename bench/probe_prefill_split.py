"""Where one sequence's prefill spends its time, dense against sparse: LLaMA-2-7B dims (random bf16, every block
linear masked at random to ``--sparsity``, then ``sparsify`` and q/k/v and gate/up stacked, as ``generate`` runs
them), one prefill of each length timed on the host (``sparse.bench.prefill_ms``: eager, median of 3) and the same
prefill's GPU kernels under ``torch.profiler``, summed into the weight unpacking, the matrix products and the rest.
The host-side remainder (wall minus the kernels' sum) is what the GPU waits on Python and launches.

    python3 bench/probe_prefill_split.py --out $OUT/prefill_split.json [--tokens 512,2048] [--layers 32]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def kind(name: str) -> str:
    n = name.lower()
    if "unpack" in n or "decompress" in n:
        return "unpack"
    if "gemm" in n or "sm90" in n or "cutlass" in n or "nvjet" in n or "xmma" in n:
        return "matmul"
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    return "other"


def profiled(model, tokens: int) -> dict:
    """One prefill's GPU kernels under ``torch.profiler`` (summed: all, by kind, the top 8 names) and, for another
    prefill, the host's functions by own time under cProfile (top 25); a warm prefill first."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    from layerprune.engine.fused import fused_ops

    dev = next(model.parameters()).device
    ids = torch.randint(10, 32000, (1, tokens), generator=torch.Generator().manual_seed(0)).to(dev)
    pr = cProfile.Profile()
    with fused_ops(model, dev):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
        pr.enable()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        pr.disable()
    per: dict[str, float] = defaultdict(float)
    names: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[kind(ev.name)] += ev.device_time / 1e3  # ms
            names[ev.name[:90]] += ev.device_time / 1e3
    top = dict(sorted(names.items(), key=lambda t: -t[1])[:8])
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    return {"kernels_ms": sum(per.values()), "by_kind_ms": dict(per), "top_ms": top, "host_profile": s.getvalue()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--tokens", default="512,2048")
    ap.add_argument("--layers", type=int, default=32)
    a = ap.parse_args()
    from layerprune.sparse.bench import prefill_ms

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sparse_decode import masked_pair

    dense, sparse = masked_pair(a.layers, a.sparsity, merge=True)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "sparsity": a.sparsity,
           "layers": a.layers, "rows": []}
    with torch.no_grad():
        for t in (int(v) for v in a.tokens.split(",")):
            row = {"tokens": t}
            for name, m in (("dense", dense), ("sparse", sparse)):
                wall = prefill_ms(m, t, vocab_hi=32000)
                k = profiled(m, t)
                row[name] = {"wall_ms": wall, **k, "host_gap_ms": wall - k["kernels_ms"]}
                print(t, name, f"wall {wall:.2f} ms, kernels {k['kernels_ms']:.2f} ms",
                      {kk: round(v, 2) for kk, v in k["by_kind_ms"].items()}, flush=True)
            row["speedup"] = row["dense"]["wall_ms"] / row["sparse"]["wall_ms"]
            res["rows"].append(row)
            for name in ("dense", "sparse"):
                print(t, name, "host profile:\n", row[name]["host_profile"][:3000], flush=True)
            Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
