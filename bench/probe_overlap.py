"""Can the unpack of the next linear's weight hide under the current linear's GEMM in a prefill? One block's four
linears of LLaMA-2-7B dims (q/k/v and gate/up stacked: 12288×4096, 4096×4096, 22016×4096, 4096×11008), ``--blocks``
times over, 70% at random, bf16, each variant captured once as a CUDA graph and its replay timed (CUDA events,
median of ``--reps``), so the host is out of the figures:

- ``dense``: ``F.linear`` on the dense weights;
- ``serial``: what the op does in prefill today, unpack (``delta_cuda.unpack``) then ``F.linear``, one stream;
- ``overlap``: the unpack of linear i + 1 into the other of two buffers on a side stream while linear i's GEMM
  runs (events order them), at normal and at high priority of the side stream.

If ``overlap`` is near ``dense`` the GPU runs the memory-bound unpack beside the compute-bound GEMM; if it is near
``serial`` the GEMM leaves no room on the SMs.

    python3 bench/probe_overlap.py --out $OUT/overlap.json [--tokens 512,1024,2048] [--blocks 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from layerprune.sparse import delta_cuda  # noqa: E402
from layerprune.sparse.delta import pack  # noqa: E402
from sparse_chunked import graphed  # noqa: E402

SHAPES = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008))


def replay_ms(fn, reps: int) -> float:
    """Median ms of one replay of ``fn`` captured as a CUDA graph (``sparse_chunked.graphed``: two warm-up calls on a
    side stream, then the capture)."""
    g, _ = graphed(fn)
    for _ in range(3):
        g.replay()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", default="512,1024,2048")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    dense, packed = [], []
    for _ in range(a.blocks):
        for n, k in SHAPES:
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
            w.masked_fill_(torch.rand(n, k, device=dev) < a.sparsity, 0)
            dense.append(w)
            p = pack(w)
            packed.append((p.values, p.deltas, p.starts, p.gptr, n, k))
    big = max(n * k for n, k in SHAPES)
    bufs = [torch.empty(big, device=dev, dtype=torch.bfloat16) for _ in range(2)]
    assert torch.equal(delta_cuda.unpack(*packed[0]), dense[0]), "unpack is not exact"
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "sparsity": a.sparsity,
           "blocks": a.blocks, "shapes": SHAPES, "rows": []}
    for T in [int(t) for t in a.tokens.split(",")]:
        xs = {k: torch.randn(T, k, device=dev, dtype=torch.bfloat16) for k in {k for _, k in SHAPES}}
        outs = [torch.empty(T, w.shape[0], device=dev, dtype=torch.bfloat16) for w in dense]

        def run_dense():
            for i, w in enumerate(dense):
                torch.matmul(xs[w.shape[1]], w.t(), out=outs[i])

        def run_serial():
            for i, (v, d, s, g, n, k) in enumerate(packed):
                w = delta_cuda.unpack(v, d, s, g, n, k, out=bufs[0][:n * k].view(n, k))
                torch.matmul(xs[k], w.t(), out=outs[i])

        def overlap(priority: int):
            side = torch.cuda.Stream(priority=priority)

            def run():
                main = torch.cuda.current_stream()
                side.wait_stream(main)
                ready = [torch.cuda.Event() for _ in packed]
                free = [torch.cuda.Event(), torch.cuda.Event()]
                v, d, s, g, n, k = packed[0]
                delta_cuda.unpack(v, d, s, g, n, k, out=bufs[0][:n * k].view(n, k))
                for i, (v, d, s, g, n, k) in enumerate(packed):
                    if i + 1 < len(packed):
                        v2, d2, s2, g2, n2, k2 = packed[i + 1]
                        j = (i + 1) % 2
                        if i >= 1:
                            side.wait_event(free[j])
                        with torch.cuda.stream(side):
                            delta_cuda.unpack(v2, d2, s2, g2, n2, k2, out=bufs[j][:n2 * k2].view(n2, k2))
                            ready[i + 1].record(side)
                    if i >= 1:
                        main.wait_event(ready[i])
                    torch.matmul(xs[k], bufs[i % 2][:n * k].view(n, k).t(), out=outs[i])
                    free[i % 2].record(main)
                main.wait_stream(side)
            return run

        row = {"tokens": T}
        # correctness of the overlapped order: the outputs equal the dense ones
        run_dense()
        ref = [o.clone() for o in outs]
        overlap(0)()
        torch.cuda.synchronize()
        row["overlap_exact"] = all(torch.equal(o, r) for o, r in zip(outs, ref))
        for name, fn in (("dense", run_dense), ("serial", run_serial), ("overlap", overlap(0)),
                         ("overlap_high", overlap(-1)), ("dense_again", run_dense)):
            row[name + "_ms"] = replay_ms(fn, a.reps)
        d = (row["dense_ms"] + row["dense_again_ms"]) / 2
        for name in ("serial", "overlap", "overlap_high"):
            row[name + "_speedup"] = d / row[name + "_ms"]
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
