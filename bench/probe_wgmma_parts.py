"""Where ``delta_wg_bf16``'s time goes: the kernel as it is, without its products (the ``wgmma`` calls removed) and
without its decode (the group loads and entry stores removed; the tiles are still zeroed, x still copied). The
outputs of the cut forms are wrong by design; only their times are read. Median µs, L2 flushed, dense
``F.linear`` in the same run.

    python3 bench/probe_wgmma_parts.py --out $OUT/parts.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.sparse import delta_cuda, delta_wgmma  # noqa: E402
from sparse_decode import brief, one_token_cases, timeit, write_rows  # noqa: E402

CUTS = {
    "full": [],
    "no_mma": [("            wg_mma(acc, wg_desc(wt + (warp >> 2) * 64 * KC + kk * 128), wg_desc(xt + kk * 128));",
                "            ;")],
    "no_decode": [("        if (bb) load_items(v, w, s, vals, dl, starts, pre, first, rows, bb, total, sub, q);\n"
                   "        store_cm(wt, v, w, s, bb, total, sub, q, c0, rb);", "        ;"),
                  ("    if (total) load_items(v, w, s, vals, dl, starts, pre[warp], first[warp], rows[warp], 0, total, sub, q);\n"
                   "    decode_chunk", "    decode_chunk"),
                  ("            if (total) load_items(v, w, s, vals, dl, starts, pre[warp], first[warp], rows[warp], 0, total, sub, q);\n"
                   "            decode_chunk", "            decode_chunk")],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x4096,28672x8192")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--forms", default="256:1:4:1,256:2:2:1", help="KC:PER_SM:NWG:STAGES,...")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    forms = [tuple(int(v) for v in f.split(":")) for f in a.forms.split(",")]
    built = {}

    def build(mt, kc, nwg, stages, cut):
        key = (mt, kc, nwg, stages, cut)
        if key not in built:
            src = delta_wgmma.source(mt, 4, kc, nwg, stages)
            for old, new in CUTS[cut]:
                assert old in src, (cut, old[:60])
                src = src.replace(old, new)
            built[key] = torch.cuda._compile_kernel(src, "delta_wg_bf16", compute_capability="90a",
                                                    nvcc_options=["--use_fast_math"])
        return built[key]

    real = delta_wgmma.kernel
    rows = []
    for n, k, s, w, sp, _ in one_token_cases(a.shapes, "0.7"):
        c256 = delta_cuda.chunk_index(sp.deltas, sp.starts, sp.gptr, n, k)
        for b in (int(v) for v in a.batches.split(",")):
            x = torch.randn(b, k, device=w.device, dtype=w.dtype)
            row = {"shape": [n, k], "sparsity": s, "batch": b, "dense_us": timeit(lambda: F.linear(x, w), a.reps)}
            for kc, per, nwg, st in forms:
                nch = -(-k // kc)
                cidx = c256 if kc == 256 else delta_cuda.chunk_index(sp.deltas, sp.starts, sp.gptr, n, k, kc)
                for cut in CUTS:
                    delta_wgmma.kernel = (lambda dev, mt, unroll=4, kc_=kc, nwg_=nwg, stages=st, swap=False, cut=cut:
                                          build(mt, kc_, nwg_, stages, cut))
                    fn = (lambda kc=kc, nwg=nwg, st=st, per=per, nch=nch, cidx=cidx: delta_wgmma.spmm_wg(
                        x, sp.values, sp.deltas, sp.starts, cidx, n, k, kc=kc, nwg=nwg, stages=st,
                        splits=delta_wgmma.splits_for(n, nch, sms, per, 64 * nwg)))
                    row[f"{kc}_{per}_{nwg}_{st}_{cut}_us"] = timeit(fn, a.reps)
                delta_wgmma.kernel = real
            rows.append(row)
            brief(row)
            write_rows(a.out, rows=rows)


if __name__ == "__main__":
    main()
