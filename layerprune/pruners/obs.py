"""SparseGPT's inner OBS loop over one column block (Frantar & Alistarh 2023, Algorithm 1: the loop over
the columns of a block of B = 128).

Given a column block ``W1`` (rows × B, fp32, already carrying the updates of earlier blocks), the block of
the upper Cholesky factor ``Hinv1`` of H⁻¹ and, for unstructured sparsity, the block's mask, every column
``i`` in turn is pruned (``q = 0`` where masked), its error ``e = (w_i − q_i) / [H⁻¹]_ii`` is recorded and
spread over the columns to its right: ``W1[:, i:] −= e · Hinv1[i, i:]`` (the OBS update, eq. 3). For N:M the
mask of columns ``i .. i+m−1`` is chosen when ``i`` reaches them, per row, as the ``n`` smallest
``w² / [H⁻¹]_jj²`` on the weights updated so far (stable order on ties, as ``torch.sort(stable=True)``).

The loop is row-independent, so :func:`obs_block` runs it as **one Triton kernel** per column block: each
program keeps a tile of rows × B in registers and walks the B columns (the reference loop issues about
ten small kernels per column, which makes a 7B solve launch-bound). :func:`obs_block_torch` is the
reference loop, the path on the CPU and without Triton. Both return ``(Q1, Err1)`` and fill ``mask1``.
"""

from __future__ import annotations

import torch

from layerprune.triton_support import usable

def obs_block_torch(W1: torch.Tensor, Hinv1: torch.Tensor, mask1: torch.Tensor, prunen: int = 0,
                    prunem: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference column loop (sparsegpt.py ``fasterprune``); ``W1`` is overwritten, ``mask1`` filled for N:M."""
    count = W1.shape[1]
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    d1 = torch.diag(Hinv1)
    for i in range(count):
        w = W1[:, i]
        d = Hinv1[i, i]
        if prunem and i % prunem == 0:
            tmp = W1[:, i : i + prunem] ** 2 / d1[i : i + prunem].reshape(1, -1) ** 2
            idx = torch.sort(tmp, dim=1, stable=True)[1][:, :prunen]
            mask1.scatter_(1, i + idx, True)
        # masked_fill, not q[mask] = 0: boolean-index assignment syncs the device every column
        q = w.masked_fill(mask1[:, i], 0)
        Q1[:, i] = q
        err1 = (w - q) / d
        W1[:, i:].addr_(err1, Hinv1[i, i:], alpha=-1)
        Err1[:, i] = err1
    return Q1, Err1


def obs_block(W1: torch.Tensor, Hinv1: torch.Tensor, mask1: torch.Tensor, prunen: int = 0, prunem: int = 0,
              fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One column block of the OBS solve: ``(Q1, Err1)``; ``mask1`` (bool, True = pruned) is read for
    unstructured sparsity and filled for N:M. One Triton kernel where it runs (``fused``), else the loop."""
    count = W1.shape[1]
    if not (fused and usable(W1.device)) or count > 256:
        return obs_block_torch(W1, Hinv1, mask1, prunen, prunem)
    import triton

    from layerprune.pruners.obs_triton import obs_block_kernel

    W = W1.contiguous()
    H = Hinv1.contiguous()
    E = torch.empty_like(W)
    M = mask1.to(torch.int8).contiguous()
    rows = W.shape[0]
    bc = max(16, triton.next_power_of_2(count))
    br = 16 if bc <= 128 else 8
    obs_block_kernel[(triton.cdiv(rows, br),)](W, E, M, H, rows, count, W.stride(0), H.stride(0),
                                                PRUNEN=int(prunen), PRUNEM=int(prunem), BR=br, BC=bc,
                                                num_warps=4)
    if prunem:
        mask1.copy_(M != 0)
    return W, E
