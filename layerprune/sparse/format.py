"""The compressed format of one pruned linear: tile-major bitmask + packed values + a 32-bit offset per tile.

W (N × K) is cut into tiles of ``bn`` output rows × ``bk`` input columns (``bk`` a multiple of 32),
padded with zeros to whole tiles, tiles numbered row-block-major (``t = rb · KT + kb``). Per tile:

* ``bitmask[t]``: ``bn × bk/32`` int32 words, bit ``j`` of word ``w`` of row ``r`` = (W[r, 32w + j] ≠ 0);
* its nonzero values, row-major inside the tile, stored contiguously in ``values`` from ``offsets[t]``;
* ``offsets`` (T + 1 int32 entries): ``offsets[t + 1] − offsets[t]`` = popcount of the tile's bitmask.

Bytes per weight: 1/8 (bitmask) + d·e (values, d = density, e = element size) + 4/(bn·bk) (offsets):
0.725 at 70% sparsity in bf16 (dense: 2), 1.126 at 50%, 0.526 at 80%. Any per-layer sparsity and any
mask fit (unstructured, N:M, unequal nonzeros per row); a kernel decodes a tile with one prefix sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerprune.errors import UserError

BN, BK = 16, 128  # the tile the kernels are built for (measured on the H200, BENCHMARKS.md)


@dataclass
class SparseTensor:
    """A packed (N × K) weight: ``bitmask`` (T, bn, bk/32) int32, ``values`` (nnz,), ``offsets`` (T+1,) int32."""

    bitmask: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    shape: tuple[int, int]
    bn: int = BN
    bk: int = BK

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.bitmask, self.values, self.offsets

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def tiles(self) -> tuple[int, int]:
        n, k = self.shape
        return -(-n // self.bn), -(-k // self.bk)


def bytes_per_weight(sparsity: float, element_size: int = 2, bn: int = BN, bk: int = BK) -> float:
    return 1 / 8 + (1 - sparsity) * element_size + 4 / (bn * bk)


def _tiles(w: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """(T, bn, bk) view of ``w`` padded to whole tiles, row-block-major."""
    n, k = w.shape
    rb, kt = -(-n // bn), -(-k // bk)
    p = torch.zeros(rb * bn, kt * bk, dtype=w.dtype, device=w.device)
    p[:n, :k] = w
    return p.view(rb, bn, kt, bk).permute(0, 2, 1, 3).reshape(rb * kt, bn, bk)


@torch.no_grad()
def pack(w: torch.Tensor, bn: int = BN, bk: int = BK) -> SparseTensor:
    """Compress ``w``: exact (unpack returns ``w`` bit for bit, including ``-0.0`` as 0)."""
    if w.dim() != 2:
        raise ValueError("pack expects a 2-D weight")
    if bk % 32:
        raise ValueError("bk must be a multiple of 32")
    t = _tiles(w, bn, bk)
    mask = t != 0
    values = t[mask].contiguous()  # row-major inside each tile, tiles in order
    counts = mask.flatten(1).sum(1)
    offsets = torch.zeros(t.shape[0] + 1, dtype=torch.int64, device=w.device)
    offsets[1:] = torch.cumsum(counts, 0)
    if int(offsets[-1]) >= 2**31:
        raise ValueError("more than 2^31 nonzeros in one linear: split it")
    bits = mask.view(t.shape[0], bn, bk // 32, 32).to(torch.int64)
    words = (bits << torch.arange(32, device=w.device)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return SparseTensor(words.contiguous(), values, offsets.to(torch.int32), tuple(w.shape), bn, bk)


def tile_mask(bitmask: torch.Tensor) -> torch.Tensor:
    """(T, bn, bk) bool from the int32 words."""
    T, bn, nw = bitmask.shape
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(T, bn, nw * 32)


@torch.no_grad()
def unpack(sp: SparseTensor) -> torch.Tensor:
    """The dense (N × K) weight (the plain-PyTorch path: correct, not fast)."""
    n, k = sp.shape
    rb, kt = sp.tiles()
    mask = tile_mask(sp.bitmask)
    t = torch.zeros(mask.shape, dtype=sp.values.dtype, device=sp.values.device)
    t[mask] = sp.values
    return t.view(rb, kt, sp.bn, sp.bk).permute(0, 2, 1, 3).reshape(rb * sp.bn, kt * sp.bk)[:n, :k]


def validate(sp: SparseTensor, name: str = "weight") -> None:
    """Refuse a packed weight whose offsets disagree with its bitmask (a corrupted or truncated file)."""
    rb, kt = sp.tiles()
    want = (rb * kt, sp.bn, sp.bk // 32)
    if tuple(sp.bitmask.shape) != want or sp.offsets.numel() != rb * kt + 1:
        raise UserError(f"sparse tensor {name} has the wrong shape for {sp.shape}: the checkpoint is damaged")
    counts = tile_mask(sp.bitmask).flatten(1).sum(1)
    off = sp.offsets.to(torch.int64)
    if int(off[0]) != 0 or not torch.equal(off[1:] - off[:-1], counts.to(off.device)) or int(off[-1]) != sp.nnz:
        raise UserError(f"sparse tensor {name}: offsets disagree with the bitmask popcounts "
                        "(a corrupted or truncated checkpoint): export it again")
