"""The Triton kernel behind :func:`layerprune.pruners.obs.obs_block` (imported only when it runs).

One program holds ``BR`` rows × ``BC`` columns of the block in registers and walks its columns: N:M groups
chosen per row when reached (rank of w²/d² among the group, ties to the earlier column), q = 0 where masked,
e = (w − q) / d, then the OBS update w −= e · Hinv1[i, :] over the columns to the right.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def obs_block_kernel(W, E, M, H, rows, count, ldw, ldh,
                     PRUNEN: tl.constexpr, PRUNEM: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BR + tl.arange(0, BR)
    c = tl.arange(0, BC)
    rm = r < rows
    cm = c < count
    m2 = rm[:, None] & cm[None, :]
    off = r[:, None] * ldw + c[None, :]
    w = tl.load(W + off, mask=m2, other=0.0)
    msk = tl.load(M + off, mask=m2, other=0).to(tl.int32)
    dcol = tl.load(H + c * ldh + c, mask=cm, other=1.0)
    err = tl.zeros([BR, BC], dtype=tl.float32)
    for i in range(0, count):
        if PRUNEM > 0:
            if i % PRUNEM == 0:  # choose this group's N:M mask on the weights updated so far
                tmp = w * w / (dcol * dcol)[None, :]
                for j in tl.static_range(PRUNEM):
                    tj = tl.sum(tl.where((c == i + j)[None, :], tmp, 0.0), axis=1)
                    rank = tl.zeros([BR], dtype=tl.int32)
                    for k in tl.static_range(PRUNEM):
                        if k != j:
                            tk = tl.sum(tl.where((c == i + k)[None, :], tmp, 0.0), axis=1)
                            if k < j:  # ties: the earlier column counts as smaller (stable sort)
                                before = tk <= tj
                            else:
                                before = tk < tj
                            rank += (before & (i + k < count)).to(tl.int32)
                    hit = (rank < PRUNEN) & (i + j < count)
                    msk = tl.where((c == i + j)[None, :], hit.to(tl.int32)[:, None], msk)
        sel = (c == i)[None, :]
        wi = tl.sum(tl.where(sel, w, 0.0), axis=1)
        mi = tl.sum(tl.where(sel, msk, 0), axis=1)
        d = tl.load(H + i * ldh + i)
        hrow = tl.load(H + i * ldh + c, mask=cm & (c >= i), other=0.0)
        q = tl.where(mi != 0, 0.0, wi)
        e = (wi - q) / d
        w = w - e[:, None] * hrow[None, :]
        w = tl.where(sel, q[:, None], w)
        err = tl.where(sel, e[:, None], err)
    tl.store(W + off, w, mask=m2)
    tl.store(E + off, err, mask=m2)
    if PRUNEM > 0:
        tl.store(M + off, msk.to(tl.int8), mask=m2)
