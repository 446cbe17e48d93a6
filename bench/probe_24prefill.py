"""2:4 weights at 64–2048 tokens on the sparse tensor cores through cuSPARSELt, side by side with dense ``F.linear``
and layerprune's nm24 op (median µs, L2 flushed, ``sparse_decode.timeit``; eager, and replayed from a CUDA graph):

- ``cslt``: ``torch._cslt_sparse_mm`` on a weight compressed once by ``torch._cslt_compress``, the algorithm searched
  once;
- ``nm24_cslt``: the same product on the nm24 weight converted to cuSPARSELt's layout on every call
  (:func:`layerprune.sparse.cslt.convert`; ``convert_us`` its time alone), checked byte for byte against
  ``_cslt_compress``;
- ``mm``: layerprune's own call (:func:`layerprune.sparse.cslt.mm`: the conversion, then cuSPARSELt through ctypes
  with the plan kept; ``plan_ms`` the first call, which makes the plan and searches its algorithm); ``mm_default``
  the same with cuSPARSELt's default algorithm (``plan_default_ms``: its plan made);
- ``unpack_cublas``: the nm24 weight unpacked (CUDA kernel), then ``F.linear``; ``nm24_op``: the op as it routes.

(Session 28's run also timed PyTorch's CUTLASS 2:4 kernels, ``_sparse_semi_structured_linear``: they refuse compute
capability 9.0.)

``--dump DIR`` also writes cuSPARSELt's compressed bytes for small shapes whose kept values encode their row and
kept-column index (4 probes, one mask) and whose masks encode each 4-group's index in base-6 digits (one pattern
of the six per group and probe), so that its layout can be read off on a CPU.

    python3 bench/probe_24prefill.py --out $OUT/p.json [--dump $OUT/cslt_layout]
    python3 bench/probe_24prefill.py --read bench/results/cslt_layout_session28   # on a CPU: the layout, checked

What ``--read`` finds (cuSPARSELt 0.8.0, H200, bf16; BENCHMARKS.md session 28): the kept values row-major (n × k/2),
then one 4-bit code per group of four (i0 | i1 << 2, i0 < i1) at nibble :func:`layerprune.sparse.cslt.nibble` (r, g).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from probe_cslt import graphed, timed_variant  # noqa: E402
from sparse_decode import DEV, brief, masked, op, shape_list, timeit, write_rows  # noqa: E402

from layerprune.pruners.masks import nm_mask  # noqa: E402
from layerprune.sparse import cslt, nm24_cuda  # noqa: E402
from layerprune.sparse.cslt import nibble  # noqa: E402
from layerprune.sparse.nm24 import kept, pack as npack  # noqa: E402

PATTERNS = list(itertools.combinations(range(4), 2))  # the six ways to keep 2 of 4


def mask_from_patterns(pat: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[n, k] bool keeping, in 4-group g of row r, the two positions PATTERNS[pat[r, g]]."""
    table = torch.zeros(6, 4, dtype=torch.bool)
    for i, (a, b) in enumerate(PATTERNS):
        table[i, a] = table[i, b] = True
    return table[pat.long()].reshape(n, k)


def cslt_pack(w: torch.Tensor) -> torch.Tensor:
    """A 2:4 bf16 weight (n × k, n a multiple of 64, k of 32) as the bytes ``torch._cslt_compress`` gives on the H200
    (cuSPARSELt 0.8.0), built without cuSPARSELt: the kept values row-major, then the 4-bit codes at
    :func:`layerprune.sparse.cslt.nibble`. The kept positions as nm24 chooses them (``nm24.kept``; for a group with
    fewer than two nonzeros, or a -0.0, the bytes differed from cuSPARSELt's in session 29's GPU test: the byte-for-byte
    checks use weights with two nonzeros in every group)."""
    n, k = w.shape
    pos, vals = kept(w)
    code = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8).reshape(-1)
    where = nibble(torch.arange(n, device=w.device)[:, None], torch.arange(k // 4, device=w.device)[None, :],
                   k // 4).reshape(-1)
    nib = torch.empty_like(code)
    nib[where] = code
    meta = nib[0::2] | (nib[1::2] << 4)
    return torch.cat([vals.reshape(-1).view(torch.uint8), meta])


def emulate_convert(sp, n: int, k: int) -> torch.Tensor:
    """:data:`layerprune.sparse.cslt.CONVERT`'s index arithmetic run thread by thread in Python on a CPU (small
    weights only): the bytes it would write for the nm24 weight ``sp``."""
    vals = sp.values.reshape(-1, 32, 8).view(torch.int32).reshape(-1, 32, 4)
    meta = sp.meta.reshape(-1, 16)
    KT, G = k // 32, k // 4
    outv = torch.zeros(n * k // 4, dtype=torch.int32)
    outm = torch.zeros(n * k // 8, dtype=torch.uint8)
    for tile in range(vals.shape[0]):
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            r0, tc = (tile // KT) * 16 + g, tile % KT
            pv = vals[tile, lane].tolist()
            m0, m1 = int(meta[tile, 2 * g]) & 0xFFFFFFFF, int(meta[tile, 2 * g + 1]) & 0xFFFFFFFF
            pm = [m0, m0 >> 16, m1, m1 >> 16]
            for q in range(4):
                outv[(r0 + 8 * (q & 1)) * (k >> 2) + tc * 8 + t + 4 * (q >> 1)] = pv[q]
            for h in range(2):
                lo, hi = (pm[2 * h] >> (4 * t)) & 15, (pm[2 * h + 1] >> (4 * t)) & 15
                outm[nibble(r0, tc * 8 + t + 4 * h, G) >> 1] = lo | (hi << 4)
    return torch.cat([outv.view(torch.uint8), outm])


def read(folder: Path) -> list[bool]:
    """Check the dumps of :func:`dump` against the row-major values and :func:`layerprune.sparse.cslt.nibble`, and :func:`cslt_pack`
    against every dumped compression byte for byte; one line a dump, and every check's outcome returned."""
    outcomes = []
    code = {a | (b << 2): i for i, (a, b) in enumerate(PATTERNS)}
    for f in sorted(folder.glob("cslt_*.pt")):
        rec = torch.load(f)
        n, k = rec["shape"]
        nv = n * k  # bytes of values
        rows = torch.arange(n)[:, None].expand(n, k // 2)
        vals = rec["values"]["r_lo"].reshape(-1)[:nv].view(torch.bfloat16).float().reshape(n, k // 2)
        ok_values = bool((vals == (rows % 256 + 1).float()).all())
        idx = torch.zeros(n * (k // 4), dtype=torch.long)
        for d, c in rec["masks"].items():
            b = c.reshape(-1)[nv:]
            nib = torch.stack([b & 15, b >> 4], 1).reshape(-1)
            idx += torch.tensor([code[int(v)] for v in nib]) * 6 ** int(d)
        want = torch.tensor([nibble(r, g, k // 4) for r in range(n) for g in range(k // 4)])
        got = torch.empty_like(idx)
        got[idx] = torch.arange(idx.numel())
        same = []
        base = mask_from_patterns(rec["base_patterns"].long(), n, k)
        cols = torch.arange(k // 2)[None, :].expand(n, k // 2)
        enc = {"r_lo": rows % 256 + 1, "r_hi": rows // 256 + 1, "j_lo": cols % 256 + 1, "j_hi": cols // 256 + 1}
        for name, v in enc.items():
            w = torch.zeros(n, k)
            w[base] = v.reshape(-1).float()
            same.append(torch.equal(cslt_pack(w.bfloat16()), rec["values"][name].reshape(-1)))
        groups = torch.arange(n * (k // 4)).reshape(n, k // 4)
        for d, c in rec["masks"].items():
            w = mask_from_patterns((groups // 6 ** int(d)) % 6, n, k).bfloat16()
            same.append(torch.equal(cslt_pack(w), c.reshape(-1)))
        print(f"{n}x{k}: values row-major {ok_values}, metadata at cslt_nibble {bool((got == want).all())}, "
              f"cslt_pack equals {sum(same)} of {len(same)} compressions byte for byte")
        outcomes += [ok_values, bool((got == want).all())] + same
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(n))
        w = w.masked_fill(nm_mask(w.abs(), 2, 4), 0).bfloat16()
        conv_ok = torch.equal(emulate_convert(npack(w), n, k), cslt_pack(w))
        print(f"{n}x{k}: the nm24 → cuSPARSELt kernel's arithmetic, emulated, equals cslt_pack: {conv_ok}")
        outcomes.append(conv_ok)
    return outcomes


def dump(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for n, k in [(64, 64), (128, 256), (256, 512), (512, 1024)]:
        g = torch.Generator().manual_seed(n + k)
        base = torch.randint(0, 6, (n, k // 4), generator=g)
        m0 = mask_from_patterns(base, n, k)
        rows = torch.arange(n)[:, None].expand(n, k // 2)
        cols = torch.arange(k // 2)[None, :].expand(n, k // 2)
        rec = {"shape": [n, k], "base_patterns": base.to(torch.uint8), "values": {}, "masks": {}}
        for name, v in {"r_lo": rows % 256 + 1, "r_hi": rows // 256 + 1,
                        "j_lo": cols % 256 + 1, "j_hi": cols // 256 + 1}.items():
            w = torch.zeros(n, k)
            w[m0] = v.reshape(-1).float()
            c = torch._cslt_compress(w.to(DEV, torch.bfloat16))
            rec["values"][name] = c.view(torch.uint8).cpu()
        idx = torch.arange(n * (k // 4)).reshape(n, k // 4)
        digits = 0
        while 6 ** digits < n * (k // 4):
            digits += 1
        for d in range(digits):
            pat = (idx // 6 ** d) % 6
            w = mask_from_patterns(pat, n, k).float()
            c = torch._cslt_compress(w.to(DEV, torch.bfloat16))
            rec["masks"][d] = c.view(torch.uint8).cpu()
        torch.save(rec, out / f"cslt_{n}x{k}.pt")
        print("dumped", n, k, "compressed bytes", rec["values"]["r_lo"].numel(), "dense bytes", 2 * n * k, flush=True)


def default_alg(x, sp, n, k):
    """:func:`layerprune.sparse.cslt.mm` with plans not searched (cuSPARSELt's default algorithm)."""
    cslt.SEARCH = False
    try:
        return cslt.mm(x, sp.values, sp.meta, n, k)
    finally:
        cslt.SEARCH = True


def served(y):
    """``y``, or a RuntimeError when the call declined (returned ``None``)."""
    if y is None:
        raise RuntimeError("declined (returned None)")
    return y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--read", default="")
    ap.add_argument("--shapes", default="4096x4096,1024x4096,11008x4096,4096x11008,14336x4096,8192x8192,"
                                        "28672x8192,8192x28672")
    ap.add_argument("--batches", default="64,256,512,2048")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--dump", default="")
    a = ap.parse_args()
    if a.read:
        sys.exit(0 if all(read(Path(a.read))) else 1)
    if not a.out:
        ap.error("--out FILE (the timings' JSON) or --read DIR")
    if a.dump:
        dump(Path(a.dump))
    checks, rows = [], []
    for n, k in shape_list(a.shapes):
        w = masked(n, k, "2:4")
        sp = npack(w)
        wc = torch._cslt_compress(w)
        same = torch.equal(cslt_pack(w), wc.view(torch.uint8).reshape(-1))  # the layout read off small dumps, at size
        conv = lambda: cslt.convert(sp.values, sp.meta, n, k).view(torch.bfloat16).view(wc.shape)  # noqa: E731
        same_conv = torch.equal(conv().view(torch.uint8).reshape(-1), wc.view(torch.uint8).reshape(-1))
        print(f"{n}x{k}: cslt_pack equals _cslt_compress: {same}; the nm24 → cuSPARSELt kernel: {same_conv}",
              flush=True)
        for b in (int(v) for v in a.batches.split(",")):
            x = torch.randn(b, k, device=DEV, dtype=torch.bfloat16)
            ref = F.linear(x.float(), w.float())
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            cslt.mm(x, sp.values, sp.meta, n, k)  # makes the plan and searches its algorithm
            torch.cuda.synchronize()
            plan_ms = 1e3 * (time.perf_counter() - t0)
            t0 = time.perf_counter()
            default_alg(x, sp, n, k)  # the plan with cuSPARSELt's default algorithm, not searched
            torch.cuda.synchronize()
            plan_default_ms = 1e3 * (time.perf_counter() - t0)
            alg = torch._cslt_sparse_mm_search(wc, x.t())
            fns = {"dense": lambda: F.linear(x, w),
                   "nm24_op": lambda: op(x, sp, n, k),
                   "cslt": lambda: torch._cslt_sparse_mm(wc, x.t(), transpose_result=True, alg_id=alg),
                   "nm24_cslt": lambda: torch._cslt_sparse_mm(conv(), x.t(), transpose_result=True, alg_id=alg),
                   "mm": lambda: served(cslt.mm(x, sp.values, sp.meta, n, k)),
                   "mm_default": lambda: served(default_alg(x, sp, n, k)),
                   "unpack_cublas": lambda: F.linear(x, nm24_cuda.unpack(sp.values, sp.meta, n, k))}
            row = {"shape": [n, k], "sparsity": "2:4", "batch": b, "cslt_pack_equal": same, "convert_equal": same_conv,
                   "plan_ms": plan_ms,
                   "plan_default_ms": plan_default_ms}
            for name, fn in fns.items():
                timed_variant(row, checks, name, lambda fn=fn: fn, ref, a.reps, shape=[n, k], batch=b, variant=name)
                if name not in ("nm24_op", "unpack_cublas") and f"{name}_us" in row:
                    row[f"{name}_graph_us"] = timeit(graphed(fn), a.reps)
            row["convert_us"] = timeit(conv, a.reps)
            rows.append(row)
            brief(row, "shape", "batch", "plan_ms", "dense_us", "dense_graph_us", "nm24_op_us", "unpack_cublas_us",
                  "plan_default_ms", "mm_us", "mm_graph_us", "mm_default_us", "cslt_us", "cslt_graph_us", "convert_us", "nm24_cslt_us",
                  "nm24_cslt_graph_us", "cslt_error", "nm24_cslt_error", "mm_error")
            write_rows(a.out, checks=checks, linears=rows)
    print("correct:", all(c["ok"] for c in checks), flush=True)


if __name__ == "__main__":
    main()
