"""Triton kernels for the two memory-bound pieces of a LLaMA-style block forward: RMSNorm and the rotary
embedding. Imported on first use (see :mod:`layerprune.engine.fused`).

Both kernels reproduce the roundings of transformers' PyTorch code, so the forwards they serve give the same
numbers:

- rotary (``q·cos + rotate_half(q)·sin``): every product is formed in fp32 and rounded to the model dtype,
  then the sum is rounded, as PyTorch's three elementwise kernels do. Bit-identical (tested).
- RMSNorm (``w · (x · rsqrt(mean(x²) + ε)).to(dtype)``): fp32 statistics, the normalised row rounded to the
  model dtype, then the weight product rounded. Only the order of the fp32 sum of squares differs from
  PyTorch's reduction, so an element can differ by one unit in the last place of the model dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round(x, dt: tl.constexpr):
    """fp32 ``x`` rounded to ``dt`` (nearest, ties to even), returned in fp32. Rounded on the bits (and, for
    fp16's subnormal range, by adding and removing 0.75, whose last place is 2^-24), not by a conversion:
    Triton's interpreter truncates when it converts, and on the H200 a compiled fp16 round trip did not
    round as PyTorch does. Overflow is left to the final conversion."""
    if dt == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    elif dt == tl.float16:  # 10 fraction bits; below 2^-14 (subnormal) a fixed step of 2^-24
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0xFFF + ((u >> 13) & 1)) & 0xFFFFE000
        return tl.where(tl.abs(x) < 6.103515625e-05, (x + 0.75) - 0.75, u.to(tl.float32, bitcast=True))
    else:
        return x


@triton.jit
def _rms_norm_kernel(X, W, Y, sx, sy, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(X + row * sx + cols, mask=m, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    h = _round(x * tl.math.rsqrt(var + eps), Y.dtype.element_ty)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + row * sy + cols, _round(w * h, Y.dtype.element_ty).to(Y.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps)).to(x.dtype)`` in one pass over ``x``
    (weight and x of one dtype; x's last dimension contiguous)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), n, eps, BLOCK=block,
                                         num_warps=min(16, max(1, block // 512)))
    return y.view(x.shape)


@triton.jit
def _rope_kernel(X, C, S, Y, L, H, sxb, sxh, sxl, scb, scl, syb, syh, syl,
                 HALF: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b, s = pid // L, pid % L
    h = tl.arange(0, BH)[:, None]
    j = tl.arange(0, BD)[None, :]
    mj = j < HALF
    m = (h < H) & mj
    cs = b * scb + s * scl
    c1 = tl.load(C + cs + j, mask=mj, other=0.0).to(tl.float32)
    c2 = tl.load(C + cs + HALF + j, mask=mj, other=0.0).to(tl.float32)
    s1 = tl.load(S + cs + j, mask=mj, other=0.0).to(tl.float32)
    s2 = tl.load(S + cs + HALF + j, mask=mj, other=0.0).to(tl.float32)
    xo = X + b * sxb + s * sxl + h * sxh
    x1 = tl.load(xo + j, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xo + HALF + j, mask=m, other=0.0).to(tl.float32)
    dt = Y.dtype.element_ty
    # q·cos + rotate_half(q)·sin, rotate_half(q) = cat(−x2, x1); each product rounded, then the sum
    o1 = _round(_round(x1 * c1, dt) - _round(x2 * s1, dt), dt).to(dt)
    o2 = _round(_round(x2 * c2, dt) + _round(x1 * s2, dt), dt).to(dt)
    yo = Y + b * syb + s * syl + h * syh
    tl.store(yo + j, o1, mask=m)
    tl.store(yo + HALF + j, o2, mask=m)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)`` for ``x`` [B, H, L, D]
    (any strides, last one 1) and ``cos``/``sin`` [B or 1, L, D]; the result has ``x``'s layout."""
    bsz, heads, length, d = x.shape
    y = torch.empty_like(x)
    if y.stride(-1) != 1:  # empty_like keeps a dense permutation's strides; anything else becomes contiguous
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    half = d // 2
    scb = 0 if cos.shape[0] == 1 else cos.stride(0)
    if bsz * length:
        _rope_kernel[(bsz * length,)](x, cos, sin, y, length, heads, x.stride(0), x.stride(1), x.stride(2),
                                      scb, cos.stride(1), y.stride(0), y.stride(1), y.stride(2),
                                      HALF=half, BH=triton.next_power_of_2(heads), BD=triton.next_power_of_2(half),
                                      num_warps=4)
    return y
