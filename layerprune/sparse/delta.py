"""The ``delta`` layout of a pruned linear (the default): per row, its nonzeros as values + 4-bit column deltas.

W (N × K) is stored row by row. A row's nonzeros, in column order, become *entries*: a value and a delta,
the number of zero columns skipped before it (0–15). A gap of 16 or more zeros is bridged by *filler*
entries (value 0, delta 15: each steps 16 columns). A row's entries are padded with (0, 0) entries to a
whole number of *groups* of 32 entries; a row without nonzeros has no group. Per group ``g``:

* ``values[32g : 32g+32]``: the 32 entry values (the weight's dtype);
* ``deltas[16g : 16g+16]`` (uint8): byte ``b`` holds entry ``b``'s delta in its low nibble and entry
  ``16+b``'s in its high nibble, so a kernel unpacks the two halves with one mask and one shift;
* ``starts[g]`` (int16, read as unsigned): the column the group's first delta counts from, so entry ``e``
  of the group sits at column ``starts[g] + Σ_{i≤e} (delta_i + 1) − 1``: groups decode independently;
* ``gptr`` (N + 1 int32): row ``r`` owns groups ``gptr[r] … gptr[r+1]−1``.

Bytes per weight ≈ d·(e + ½) + d·2/32 (+ fillers, padding, 4 bytes per row), d = density, e = element
size: 0.77 at 70% sparsity in bf16 (dense: 2), 1.28 at 50%, 0.51 at 80% (``nbytes`` gives the exact
figure of a packed weight). It is the CSR-with-4-bit-deltas idea of MACKO (Macko, 2025), grouped so
that each group's columns come from one 16-wide prefix sum. Any mask fits: unstructured, N:M, unequal
nonzeros per row, empty rows. K must be below 65536 (the 16-bit group starts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerprune.errors import UserError

GROUP = 32  # entries per group
HALF = GROUP // 2
MAX_K = 65536


@dataclass
class DeltaTensor:
    """A packed (N × K) weight: ``values`` (G·32,), ``deltas`` (G·16,) uint8, ``starts`` (G,) int16,
    ``gptr`` (N+1,) int32."""

    values: torch.Tensor
    deltas: torch.Tensor
    starts: torch.Tensor
    gptr: torch.Tensor
    shape: tuple[int, int]

    @property
    def groups(self) -> int:
        return int(self.starts.numel())

    @property
    def nnz(self) -> int:
        """Stored nonzeros (fillers and padding hold zeros)."""
        return int((self.values != 0).sum())

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.values, self.deltas, self.starts, self.gptr

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())


def bytes_per_weight(sparsity: float, element_size: int = 2) -> float:
    """The format's bytes per weight for a random mask of this sparsity, fillers and padding left out."""
    d = 1 - sparsity
    return d * (element_size + 0.5) + d * 2 / GROUP


@torch.no_grad()
def pack(w: torch.Tensor) -> DeltaTensor:
    """Compress ``w`` (on its own device): exact, ``unpack`` returns ``w`` bit for bit (``-0.0`` as 0)."""
    if w.dim() != 2:
        raise ValueError("pack expects a 2-D weight")
    n, k = w.shape
    if k >= MAX_K:
        raise ValueError(f"pack: {k} input features; the format's 16-bit group starts hold fewer than {MAX_K}")
    dev = w.device
    rows, cols = (w != 0).nonzero(as_tuple=True)
    vals = w[rows, cols]
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    prev = torch.full_like(cols, -1)
    prev[1:] = cols[:-1]
    gap = cols - torch.where(first, -1, prev) - 1  # zero columns skipped before each nonzero
    fill = gap // 16
    emit = fill + 1  # entries per nonzero: its fillers, then itself
    ent_row = torch.zeros(n, dtype=torch.int64, device=dev).index_add_(0, rows, emit)
    g_row = (ent_row + GROUP - 1) // GROUP
    gptr = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    gptr[1:] = torch.cumsum(g_row, 0)
    G = int(gptr[-1])
    if G * GROUP >= 2**31:
        raise ValueError("more than 2^31 entries in one linear: split it")
    row_base = torch.cumsum(ent_row, 0) - ent_row  # entries of all earlier rows (unpadded)
    pos = gptr[:-1][rows] * GROUP + torch.cumsum(emit, 0) - row_base[rows] - 1
    values = torch.zeros(G * GROUP, dtype=w.dtype, device=dev)
    values[pos] = vals
    delta = torch.zeros(G * GROUP, dtype=torch.int64, device=dev)
    delta[pos] = gap - 16 * fill
    nf = int(fill.sum())
    if nf:
        fstart = torch.repeat_interleave(pos - fill, fill)
        within = torch.arange(nf, device=dev) - torch.repeat_interleave(torch.cumsum(fill, 0) - fill, fill)
        delta[fstart + within] = 15
    starts = _starts(delta.view(G, GROUP), gptr)
    d = delta.view(G, 2, HALF)
    deltas = (d[:, 0] | (d[:, 1] << 4)).to(torch.uint8).reshape(-1)
    return DeltaTensor(values, deltas, starts.to(torch.int32).to(torch.int16), gptr.to(torch.int32), (n, k))


def _starts(delta: torch.Tensor, gptr: torch.Tensor) -> torch.Tensor:
    """Each group's start column (int64, G): the row's running column count before the group."""
    G = delta.shape[0]
    span = (delta + 1).sum(1)  # columns a group advances
    cs = torch.cumsum(span, 0) - span  # over all groups
    n = gptr.numel() - 1
    g_row = (gptr[1:] - gptr[:-1]).to(torch.int64)
    row_of = torch.repeat_interleave(torch.arange(n, device=delta.device), g_row, output_size=G)
    if not G:
        return cs
    return cs - cs[gptr[:-1].to(torch.int64).clamp(max=G - 1)][row_of]


def _deltas(sp: DeltaTensor) -> torch.Tensor:
    """(G, 32) int64 deltas in entry order."""
    b = sp.deltas.view(-1, HALF).to(torch.int64)
    return torch.cat([b & 15, b >> 4], 1)


def _columns(sp: DeltaTensor) -> torch.Tensor:
    """(G, 32) int64 column of every entry (padding entries may lie past the last column)."""
    s = sp.starts.to(torch.int64) & 0xFFFF
    return s[:, None] + torch.cumsum(_deltas(sp) + 1, 1) - 1


def _rows(sp: DeltaTensor) -> torch.Tensor:
    g = sp.gptr.to(torch.int64)
    return torch.repeat_interleave(torch.arange(sp.shape[0], device=g.device), g[1:] - g[:-1], output_size=sp.groups)


@torch.no_grad()
def unpack(sp: DeltaTensor) -> torch.Tensor:
    """The dense (N × K) weight (the plain-PyTorch path: correct, not fast)."""
    n, k = sp.shape
    out = torch.zeros(n, k, dtype=sp.values.dtype, device=sp.values.device)
    if sp.groups:
        cols = _columns(sp)
        rows = _rows(sp)[:, None].expand_as(cols)
        vals = sp.values.view(-1, GROUP)
        keep = vals != 0  # fillers and padding hold zeros; padding may point past the row
        out[rows[keep], cols[keep]] = vals[keep]
    return out


def validate(sp: DeltaTensor, name: str = "weight") -> None:
    """Refuse a packed weight whose parts disagree (a corrupted or truncated file): sizes, row pointers,
    each group's start against the previous group's deltas, every nonzero inside its row."""
    n, k = sp.shape
    G = sp.groups
    bad = UserError(f"sparse tensor {name}: its group starts, deltas and row pointers disagree "
                    "(a corrupted or truncated checkpoint): export it again")
    if (sp.gptr.numel() != n + 1 or sp.values.numel() != G * GROUP or sp.deltas.numel() != G * HALF
            or sp.deltas.dtype != torch.uint8 or k >= MAX_K):
        raise UserError(f"sparse tensor {name} has the wrong sizes for {sp.shape}: the checkpoint is damaged")
    g = sp.gptr.to(torch.int64)
    if int(g[0]) != 0 or int(g[-1]) != G or bool((g[1:] < g[:-1]).any()):
        raise bad
    if not G:
        return
    cols = _columns(sp)
    s = sp.starts.to(torch.int64) & 0xFFFF
    first = torch.zeros(G, dtype=torch.bool, device=s.device)
    first[g[:-1][g[1:] > g[:-1]]] = True
    expect = torch.cat([s[:1], cols[:-1, -1] + 1])  # a group starts where the previous one stopped
    if bool((s[first] != 0).any()) or not torch.equal(s[~first], expect[~first]):
        raise bad
    if bool(((sp.values.view(-1, GROUP) != 0) & (cols >= k)).any()):
        raise bad
