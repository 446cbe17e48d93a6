"""SparseGPT (Frantar & Alistarh 2023; methods_dlp.md §4.2): OBS pruning with weight reconstruction.

H = (2/N) Σ x xᵀ in fp32; dead inputs get H_jj = 1 and W_:j = 0; damping ``percdamp·mean(diag H)``;
Hinv = upper Cholesky factor of H⁻¹. Columns are processed in blocks of ``blocksize`` (128): the
unstructured mask is chosen per column block by w² / diag(Hinv)² (adaptive mask selection), N:M per
group of m columns on the already-updated weights; every pruned weight's error is spread over the
remaining columns (the OBS update). TF32 is disabled while solving, as in the reference.
With ``hinv_direct`` (off by default: the reference's arithmetic) the factor comes directly: for J the
flip, J H J = L Lᵀ gives H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J), so U = J L⁻¹ J is the upper Cholesky factor of H⁻¹
(unique): one Cholesky and one triangular inverse instead of the reference's Cholesky, ``cholesky_inverse``
and second Cholesky (LLaMA-2-7B's 11008-column Hessian: 58 against 114 ms on the H200,
bench/probe_solve.py). Same factor to fp32 rounding, but near-tied mask choices can flip.

Three changes for speed, none changing the algorithm: linears that read the same input (q/k/v, gate/up)
share one Hessian (accumulated once) and are solved together over their stacked rows (OBS is row-
independent given H⁻¹; each keeps its own mask rule); each 128-column block's inner loop runs as one Triton
kernel (``pruners/obs.py``; ``fused=False``: the reference loop); on CUDA, bf16/fp16 activations are
multiplied on the tensor cores with fp32 outputs (the products are exact, only the summation order differs
from the reference's fp32 ``addmm``; fp32 activations stay fp32 unless ``hessian_tf32=True``), and only
H's blocks on and above the diagonal are accumulated (``gram_upper_``; mirrored before the solve).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from dataclasses import dataclass

from layerprune.distributed import active, all_reduce_sum, reduce_count
from layerprune.options import option
from layerprune.pruners.masks import Pattern
from layerprune.pruners.obs import obs_block
from layerprune.specs import PrunerSpec
from layerprune.utils import tf32

log = logging.getLogger("layerprune")


@dataclass(frozen=True)
class SparseGPTOptions:
    blocksize: int = option(128, "SparseGPT column block (lazy batch / adaptive mask width)",
                            check=lambda v: v >= 1, must="a positive integer, e.g. 128")
    percdamp: float = option(0.01, "SparseGPT Hessian damping as a fraction of mean(diag H)",
                             check=lambda v: 0 <= v < 1, must="in [0, 1), e.g. 0.01")
    hessian_tf32: bool = option(False, "SparseGPT: let fp32 activations use TF32 tensor cores for H = Σ x xᵀ on CUDA "
                                "(faster, ~1e-3 relative error per product; bf16/fp16 activations always use exact "
                                "products with fp32 accumulation)")
    hinv_direct: bool = option(False, "SparseGPT: compute the upper Cholesky factor of H⁻¹ as J·L⁻¹·J from one Cholesky "
                               "of the flipped H (J H J = L Lᵀ) and a triangular inverse: the same factor up to fp32 "
                               "rounding at half the work (LLaMA-2-7B: 1.8 s less solve); off: the reference's "
                               "Cholesky, cholesky_inverse, Cholesky (rounding-level differences flip near-tied mask "
                               "choices: SmolLM2 at 50%, 82.6 against 83.4 WikiText-2 perplexity)", flag="--hinv-direct")
    fused: bool = option(True, "SparseGPT: run each column block's OBS loop as one Triton kernel where Triton "
                         "runs (--no-fused-obs: the reference's per-column loop; same arithmetic, ~10 launches a "
                         "column)", flag="--fused-obs")


_EXACT_MM: dict[torch.device, bool] = {}


def _exact_mm(x: torch.Tensor) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` (half-precision inputs, fp32 output) runs here."""
    if x.device not in _EXACT_MM:
        try:
            torch.mm(x[:2, :2].t(), x[:2, :2], out_dtype=torch.float32)
            _EXACT_MM[x.device] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _EXACT_MM[x.device] = False
    return _EXACT_MM[x.device]


GRAM_ROWS = 1024  # rows of H per GEMM in ``gram_upper_``


def gram_upper_(H: torch.Tensor, x: torch.Tensor, alpha: float, rows: int = GRAM_ROWS) -> None:
    """H[i:i+r, i:] += alpha · x[:, i:i+r]ᵀ x[:, i:] for every row block i: the blocks of H = Σ x xᵀ on and
    above the diagonal, fp32 output (half-precision x: exact products, as ``torch.mm(out_dtype=float32)``).
    The FLOPs are ≈ d²/2 + d·r/2 of the full product's d² (0.62× for d = 4096, 0.55× for 11008 at r = 1024)."""
    d = H.shape[0]
    half = x.dtype in (torch.bfloat16, torch.float16)
    for i in range(0, d, rows):
        a, b = x[:, i:i + rows], x[:, i:]
        prod = torch.mm(a.t(), b, out_dtype=torch.float32) if half else torch.mm(a.t().float(), b.float())
        H[i:i + rows, i:].add_(prod, alpha=alpha)


class SparseGPTPruner:
    needs_data = True

    def __init__(self, layer: nn.Linear, options: SparseGPTOptions | None = None) -> None:
        opts = options or SparseGPTOptions()
        self.layer = layer
        self.blocksize = opts.blocksize
        self.percdamp = opts.percdamp
        self.tf32 = opts.hessian_tf32
        self.fused = opts.fused
        self.hinv_direct = opts.hinv_direct
        cols = layer.in_features
        self.H = torch.zeros(cols, cols, dtype=torch.float32, device=layer.weight.device)
        self.upper = False  # H holds only the blocks on and above the diagonal (the tensor-core path)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        tmp = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1])
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _exact_mm(x):
            # bf16 × bf16 products are exact in fp32: tensor cores, fp32 accumulation, nothing rounded but sums;
            # only the blocks on and above the diagonal (H is symmetric; ``hessian`` mirrors them)
            gram_upper_(self.H, x, 2 / self.nsamples)
            self.upper = True
            return
        x = math.sqrt(2 / self.nsamples) * x.float()
        with tf32(self.tf32):
            self.H.addmm_(x.t(), x)

    def share_from(self, other: "SparseGPTPruner") -> None:
        """Take the Hessian of a linear that reads the same input (q/k/v, gate/up): H = 2/N Σ x xᵀ is the same."""
        self.H, self.nsamples, self.upper = other.H, other.nsamples, other.upper

    def hessian(self) -> torch.Tensor:
        """The full H (a copy): the accumulated blocks on and above the diagonal, mirrored when only those
        were accumulated."""
        if not self.upper:
            return self.H.clone()
        return torch.triu(self.H).add_(torch.triu(self.H, 1).T)

    def reduce(self) -> None:
        """Combine the ranks' running means into the Hessian of the whole calibration set (no-op in one process)."""
        if active():
            self.H *= self.nsamples
            all_reduce_sum(self.H)
            self.nsamples = reduce_count(self.nsamples, self.H.device)
            self.H /= max(self.nsamples, 1)

    def _hinv(self, H: torch.Tensor) -> torch.Tensor:
        cols = H.shape[0]
        diag = torch.arange(cols, device=H.device)
        damp = self.percdamp * torch.mean(torch.diag(H))
        for attempt in range(6):
            Hd = H.clone()
            Hd[diag, diag] += damp
            try:
                if self.hinv_direct:  # H⁻¹ = J L⁻ᵀ L⁻¹ J = Uᵀ U with U = J L⁻¹ J upper triangular (J: the flip)
                    L = torch.linalg.cholesky(Hd.flip(0, 1))
                    eye = torch.eye(cols, dtype=L.dtype, device=L.device)
                    return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
                L = torch.linalg.cholesky(Hd)
                Hi = torch.cholesky_inverse(L)
                return torch.linalg.cholesky(Hi, upper=True)
            except torch.linalg.LinAlgError:
                damp = damp * 10 if damp > 0 else torch.tensor(1e-6, device=H.device)
                log.warning("SparseGPT: Cholesky failed, retrying with damping x10 (attempt %d)", attempt + 1)
        raise RuntimeError("SparseGPT: Hessian is not positive definite even after heavy damping")

    @torch.no_grad()
    def prune(self, pattern: Pattern) -> torch.Tensor:
        return self.prune_group([self], [pattern])[0]

    @classmethod
    @torch.no_grad()
    def prune_group(cls, pruners: list["SparseGPTPruner"], patterns: list[Pattern]) -> list[torch.Tensor]:
        """Prune linears that share one Hessian (same input) in one OBS solve over their stacked rows.

        OBS treats rows independently given H⁻¹, so stacking q/k/v (or gate/up) changes no update; each
        linear keeps its own mask rule (its sparsity per 128-column block, or its N:M), and the solve runs
        its column loop once instead of once per linear (the loop is launch-bound on a GPU)."""
        if len({(p.n, p.m) for p in patterns if p.is_nm}) > 1 or (any(p.is_nm for p in patterns)
                                                                and not all(p.is_nm for p in patterns)):
            return [pr.prune_group([pr], [pt])[0] for pr, pt in zip(pruners, patterns)]
        lead = pruners[0]
        Ws = [p.layer.weight.data for p in pruners]
        bounds = [0]
        for w in Ws:
            bounds.append(bounds[-1] + w.shape[0])
        W = torch.cat([w.float() for w in Ws]) if len(Ws) > 1 else Ws[0].clone().float()
        with tf32(False):
            W, mask = lead._solve(W, [(bounds[j], bounds[j + 1], patterns[j]) for j in range(len(Ws))])
        out = []
        for j, p in enumerate(pruners):
            p.layer.weight.data = W[bounds[j]:bounds[j + 1]].to(p.layer.weight.dtype)
            out.append(mask[bounds[j]:bounds[j + 1]])
        return out

    def _solve(self, W: torch.Tensor, slices: list[tuple[int, int, Pattern]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The OBS solve (reference sparsegpt.py ``fasterprune``) of fp32 ``W``; rows ``r0:r1`` follow their
        own pattern. Returns the updated weights and the mask (True = pruned)."""
        rows, cols = W.shape
        H = self.hessian()  # a copy: a Hessian shared by q/k/v or gate/up stays untouched for the others
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        Hinv = self._hinv(H)
        prunen, prunem = slices[0][2].n, slices[0][2].m
        full_mask = torch.zeros_like(W, dtype=torch.bool)
        for i1 in range(0, cols, self.blocksize):
            i2 = min(i1 + self.blocksize, cols)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Hinv1 = Hinv[i1:i2, i1:i2]
            d1 = torch.diag(Hinv1)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if prunem == 0:  # adaptive mask per column block, per linear (slice)
                tmp = W1**2 / d1.reshape(1, -1) ** 2
                for r0, r1, pat in slices:
                    t = tmp[r0:r1].flatten()
                    k = int(t.numel() * pat.sparsity)
                    if k > 0:
                        sel = torch.zeros(t.numel(), dtype=torch.bool, device=W.device)
                        sel[torch.sort(t, stable=True)[1][:k]] = True
                        mask1[r0:r1] = sel.view(r1 - r0, count)
            Q1, Err1 = obs_block(W1, Hinv1, mask1, prunen, prunem, fused=self.fused)
            W[:, i1:i2] = Q1
            full_mask[:, i1:i2] = mask1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        full_mask[:, dead] = True
        return W, full_mask

    def free(self) -> None:
        self.H = torch.empty(0)  # a new empty tensor: a shared H stays with the linears still using it


SPEC = PrunerSpec("sparsegpt", SparseGPTOptions, cls=SparseGPTPruner,
                  doc="OBS with reconstruction (Frantar & Alistarh, ICML 2023)")
