"""Where SparseGPT's solve time goes on the GPU for LLaMA-2-7B-sized linears, a cheaper H⁻¹ factor, and the
Hessian accumulated by its upper blocks.

    python3 bench/probe_solve.py --out $OUT/probe_solve.json [--parts solve,gram]

Per group (q/k/v stacked, o, gate/up stacked, down; random Hessian from 8192 random bf16 tokens, fp32):
the H⁻¹ factor as the reference computes it (Cholesky → cholesky_inverse → upper Cholesky) and the same
factor from one Cholesky of the flipped H and a triangular inverse (U = J L⁻¹ J for J H J = L Lᵀ), with
their max relative difference; then the column-block loop split into mask selection (sort), the fused OBS
kernel and the trailing GEMM update. CUDA-synchronised wall seconds, median of 3.
``gram``: H accumulated by the pruner (``gram_upper_``, mirrored by ``hessian()``) over two batches of
8 × 2048 random bf16 tokens against the full ``torch.mm(out_dtype=float32)``: max relative difference, and
one 16,384-token product each way (mean of 10).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from layerprune.pruners.obs import obs_block  # noqa: E402
from layerprune.pruners.sparsegpt import SparseGPTOptions, SparseGPTPruner, gram_upper_  # noqa: E402
from layerprune.utils import tf32  # noqa: E402


def timed(fn, reps=3):
    ts, out = [], None
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def gram(res: dict) -> None:
    for d in (4096, 11008):
        p = SparseGPTPruner(torch.nn.Linear(d, 8, bias=False, device="cuda", dtype=torch.bfloat16))
        xs = [torch.randn(8, 2048, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        for x in xs:
            p.add_batch(x)
        full = sum(torch.mm(x.reshape(-1, d).t(), x.reshape(-1, d), out_dtype=torch.float32) for x in xs) * (2 / 16)
        x = xs[0].reshape(-1, d)
        H = torch.zeros(d, d, device="cuda")

        def mean10(f):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                f()
            torch.cuda.synchronize()
            return (time.perf_counter() - t) / 10

        res.setdefault("gram_upper_check", {})[d] = {
            "upper_vs_full_max_rel": float((p.hessian() - full).abs().max() / full.abs().max()),
            "full_mm_s": mean10(lambda: H.add_(torch.mm(x.t(), x, out_dtype=torch.float32))),
            "upper_blocks_s": mean10(lambda: gram_upper_(H, x, 1.0))}
        print(d, json.dumps(res["gram_upper_check"][d]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="solve,gram")
    a = ap.parse_args()
    dev = torch.device("cuda")
    groups = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "groups": {}}
    if "gram" in a.parts:
        gram(res)
    for name, (rows, cols) in groups.items() if "solve" in a.parts else ():
        lin = torch.nn.Linear(cols, rows, bias=False, device=dev, dtype=torch.bfloat16)
        pr = SparseGPTPruner(lin)
        x = torch.randn(8192, cols, device=dev, dtype=torch.bfloat16)
        pr.add_batch(x[None])
        H = pr.hessian()
        direct = SparseGPTPruner(lin, SparseGPTOptions(hinv_direct=True))
        with tf32(False):
            t_ref, U_ref = timed(lambda: pr._hinv(H))
            t_flip, U_flip = timed(lambda: direct._hinv(H))
        diff = float((U_ref - U_flip).abs().max() / U_ref.abs().max())
        W = lin.weight.data.float()
        Hinv = U_ref

        def loop(part):
            Wc = W.clone()
            ts = {"sort": 0.0, "obs": 0.0, "gemm": 0.0}
            for i1 in range(0, cols, 128):
                i2 = min(i1 + 128, cols)
                torch.cuda.synchronize(); t = time.perf_counter()
                W1 = Wc[:, i1:i2].clone()
                Hinv1 = Hinv[i1:i2, i1:i2]
                d1 = torch.diag(Hinv1)
                tmp = W1 ** 2 / d1.reshape(1, -1) ** 2
                t1 = tmp.flatten()
                k = t1.numel() // 2
                sel = torch.zeros(t1.numel(), dtype=torch.bool, device=dev)
                sel[torch.sort(t1, stable=True)[1][:k]] = True
                mask1 = sel.view(rows, i2 - i1)
                torch.cuda.synchronize(); t2 = time.perf_counter(); ts["sort"] += t2 - t
                Q1, Err1 = obs_block(W1, Hinv1, mask1)
                Wc[:, i1:i2] = Q1
                torch.cuda.synchronize(); t3 = time.perf_counter(); ts["obs"] += t3 - t2
                Wc[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
                torch.cuda.synchronize(); ts["gemm"] += time.perf_counter() - t3
            return ts

        with tf32(False):
            loop(None)
            parts = loop(None)
        row = {"shape": [rows, cols], "hinv_reference_s": t_ref, "hinv_flipped_s": t_flip,
               "factor_max_rel_diff": diff, "loop_s": parts}
        res["groups"][name] = row
        print(name, json.dumps(row), flush=True)
        del pr, H, x
        torch.cuda.empty_cache()
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
