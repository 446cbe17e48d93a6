"""The ``nm24`` layout of a 2:4 linear: the kept values and their positions in the order the sparse tensor cores
read them (``mma.sp.m16n8k32``), so that a kernel loads them straight into registers and decodes nothing.

W (N × K) has at most two nonzeros in every group of four consecutive columns (2:4, N:M with N = 2, M = 4; N a
multiple of 16, K of 32). It is cut into tiles of 16 rows × 32 columns, row strip by row strip (``tile = strip ·
K/32 + column tile``). Per tile:

* ``values[tile]`` (32 × 8, the weight's dtype): the tile's 16 × 16 kept values as the 32 lanes' A fragments of
  ``mma.sp.m16n8k32``. Kept column c (0–15) of row r is group c // 2's first (c even) or second kept value; lane
  4g + t holds (row g, kept columns 2t, 2t + 1), (row g + 8, same), (row g, 2t + 8, 2t + 9), (row g + 8, same).
  A group with fewer than two nonzeros keeps zeros at free positions.
* ``meta[tile]`` (16 × int32): the metadata words of lanes 4g and 4g + 1 (index 2g + h): bits 2c … 2c + 1 of the
  low half hold the position (0–3) in its group of row g's kept column 8h + c, the high half row g + 8's. The two
  positions of a group ascend (the ``ordered_metadata`` form of the instruction).

Bytes per weight: 1 (values) + 0.125 (metadata) = 1.125 in bf16, 0.5625× of dense, against the delta layout's
1.28 at 2:4. Exact: :func:`unpack` returns the weight bit for bit (``-0.0`` as 0). The sparse tensor cores exist
from Ampere on; :mod:`layerprune.sparse.nm24_cuda` has the kernels, and without them :func:`unpack` and
``F.linear`` serve (correct, not fast).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerprune.errors import UserError


@dataclass
class NM24Tensor:
    """A packed (N × K) 2:4 weight: ``values`` (N/16 · K/32, 32, 8), ``meta`` (N/16 · K/32, 16) int32."""

    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.values, self.meta

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())


def bytes_per_weight(element_size: int = 2) -> float:
    """The layout's bytes per weight: half the weights as values, 2 bits of position per value."""
    return element_size / 2 + 0.125


def fits(w: torch.Tensor) -> bool:
    """Whether ``w`` can take this layout: 2-D, N % 16 = 0, K % 32 = 0, at most two nonzeros in every four columns."""
    if w.dim() != 2 or w.shape[0] % 16 or w.shape[1] % 32:
        return False
    return bool(((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all())


def kept(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Of a 2:4 weight (N × K): each group of four's two kept positions, ascending (N, K/4, 2; a group with fewer
    than two nonzeros keeps them, then its first zero positions), and the kept values row by row (N, K/2)."""
    n, k = w.shape
    grp = w.view(n, k // 4, 4)
    key = (grp == 0).to(torch.int8) * 4 + torch.arange(4, device=w.device, dtype=torch.int8)
    idx = key.argsort(-1)[..., :2].sort(-1).values
    return idx, grp.gather(-1, idx).reshape(n, k // 2)


@torch.no_grad()
def pack(w: torch.Tensor) -> NM24Tensor:
    """Compress a 2:4 weight (on its own device); ``ValueError`` when it does not :func:`fit`."""
    if not fits(w):
        raise ValueError("the nm24 layout needs a 2:4 weight with N a multiple of 16 and K of 32")
    n, k = w.shape
    idx, vals = kept(w)
    R, KT = n // 16, k // 32
    v = vals.view(R, 2, 8, KT, 2, 4, 2).permute(0, 3, 2, 5, 4, 1, 6)  # strip, tile, g, t, half, row half, pair
    values = v.reshape(R * KT, 32, 8).contiguous()
    sh = 2 * torch.arange(8, device=w.device)
    m16 = (idx.reshape(n, k // 2).to(torch.int64).view(R, 2, 8, KT, 2, 8) << sh).sum(-1)  # R, row half, g, KT, h
    word = m16[:, 0] | (m16[:, 1] << 16)
    meta = word.permute(0, 2, 1, 3).reshape(R * KT, 16)
    return NM24Tensor(values, torch.where(meta >= 2**31, meta - 2**32, meta).to(torch.int32), (n, k))


def positions(meta: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """(N, K/2) int64: the position in its group of four of every kept value, from the metadata words."""
    R, KT = n // 16, k // 32
    word = (meta.to(torch.int64) & 0xFFFFFFFF).view(R, KT, 8, 2)
    m16 = torch.stack([word & 0xFFFF, word >> 16], 1).permute(0, 1, 3, 2, 4)  # R, row half, g, KT, h
    idx = (m16[..., None] >> (2 * torch.arange(8, device=meta.device))) & 3
    return idx.reshape(n, k // 2)


@torch.no_grad()
def unpack(sp: NM24Tensor) -> torch.Tensor:
    """The dense (N × K) weight (the plain-PyTorch path: correct, not fast)."""
    n, k = sp.shape
    R, KT = n // 16, k // 32
    vals = sp.values.view(R, KT, 8, 4, 2, 2, 2).permute(0, 5, 2, 1, 4, 3, 6).reshape(n, k // 4, 2)
    out = torch.zeros(n, k // 4, 4, dtype=sp.values.dtype, device=sp.values.device)
    out.scatter_(-1, positions(sp.meta, n, k).view(n, k // 4, 2), vals)
    return out.view(n, k)


def validate(sp: NM24Tensor, name: str = "weight") -> None:
    """Refuse a packed weight whose parts disagree (a corrupted or truncated file): sizes, and two ascending
    positions in every group (what the instruction reads)."""
    n, k = sp.shape
    tiles = (n // 16) * (k // 32)
    if (n % 16 or k % 32 or sp.values.shape != (tiles, 32, 8) or sp.meta.shape != (tiles, 16)
            or sp.meta.dtype != torch.int32):
        raise UserError(f"sparse tensor {name} has the wrong sizes for {sp.shape}: the checkpoint is damaged")
    if tiles:
        p = positions(sp.meta, n, k).view(n, k // 4, 2)
        if bool((p[..., 0] >= p[..., 1]).any()):
            raise UserError(f"sparse tensor {name}: its metadata holds positions out of order "
                            "(a corrupted checkpoint): export it again")
