"""Where SparseGPT's solve time goes on the GPU for LLaMA-2-7B-sized linears, and a cheaper H⁻¹ factor.

    python3 bench/probe_solve.py --out $OUT/probe_solve.json

Per group (q/k/v stacked, o, gate/up stacked, down; random Hessian from 8192 random bf16 tokens, fp32):
the H⁻¹ factor as the reference computes it (Cholesky → cholesky_inverse → upper Cholesky) and the same
factor from one Cholesky of the flipped H and a triangular inverse (U = J L⁻¹ J for J H J = L Lᵀ), with
their max relative difference; then the column-block loop split into mask selection (sort), the fused OBS
kernel and the trailing GEMM update. CUDA-synchronised wall seconds, median of 3.
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
from layerprune.pruners.sparsegpt import SparseGPTPruner  # noqa: E402
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


def flipped_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    Hd = H.clone()
    Hd.diagonal().add_(damp)
    L = torch.linalg.cholesky(Hd.flip(0, 1))
    Li = torch.linalg.solve_triangular(L, torch.eye(L.shape[0], device=L.device, dtype=L.dtype), upper=False)
    return Li.flip(0, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = torch.device("cuda")
    groups = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "groups": {}}
    for name, (rows, cols) in groups.items():
        lin = torch.nn.Linear(cols, rows, bias=False, device=dev, dtype=torch.bfloat16)
        pr = SparseGPTPruner(lin)
        x = torch.randn(8192, cols, device=dev, dtype=torch.bfloat16)
        pr.add_batch(x[None])
        H = pr.hessian()
        damp = float(0.01 * torch.diag(H).mean())
        with tf32(False):
            t_ref, U_ref = timed(lambda: pr._hinv(H))
            t_flip, U_flip = timed(lambda: flipped_factor(H, damp))
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
