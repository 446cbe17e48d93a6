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


def bytes_per_weight(sparsity: float, element_size: int = 2, compact: bool = False) -> float:
    """The format's bytes per weight for a random mask of this sparsity, fillers and padding left out
    (``compact``: the compact form of a bf16 weight, 2 bytes an entry and 3 a group)."""
    d = 1 - sparsity
    if compact:
        return d * 2 + d * 3 / GROUP
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


COMPACT_SPAN = 15  # exponent offsets 1 … 15 above a group's base
COMPACT_BASE = 127  # the largest base: the kernels scale by the float 2^base


def compact(sp: DeltaTensor) -> DeltaTensor | None:
    """The compact form of a packed bf16 weight, or ``None`` where some group does not fit it (then the weight
    stays as it is). Each entry becomes one 16-bit word, [sign:1][delta:4][exponent offset:4][mantissa:7]; per group
    one byte, its *base* b ≤ ``COMPACT_BASE``. Offset 0 (with mantissa and sign 0) is the value 0 (fillers,
    padding); a nonzero's bf16 exponent is b + offset, so a group fits when its nonzeros' exponents e satisfy
    1 ≤ e − b ≤ ``COMPACT_SPAN`` for b = min(smallest e − 1, 127): within 15 values of each other, none
    subnormal, none of magnitude 2^16 or more. Exact: :func:`expand` gives ``sp`` back bit for bit.

    A kernel decodes an entry with two integer operations and one multiplication: the word at the top of a float,
    its delta masked out, is ±2^(offset − 127)·1.m, and times the float 2^b it is the weight (exactly).

    ``values`` then holds the entries (int16, G·32), ``deltas`` the bases (uint8, G); ``starts`` and ``gptr`` are
    unchanged. Bytes per group: 64 + 1 + 2 against 64 + 16 + 2, so 0.82× of the plain form: 0.63 bytes per
    weight at 70% sparsity (``bytes_per_weight(…, compact=True)``), 0.32× of dense bf16."""
    if sp.values.dtype != torch.bfloat16:
        return None
    G = sp.groups
    bits = sp.values.view(torch.int16).to(torch.int32) & 0xFFFF
    e = ((bits >> 7) & 0xFF).view(G, GROUP)
    nz = ((bits & 0x7FFF) != 0).view(G, GROUP)
    lo = torch.where(nz, e, torch.full_like(e, 0xFF)).amin(1)
    base = (lo - 1).clamp(0, COMPACT_BASE)
    off = torch.where(nz, e - base[:, None], torch.zeros_like(e))
    if bool((nz & ((off < 1) | (off > COMPACT_SPAN))).any()):
        return None
    b = bits.view(G, GROUP)
    word = (b & 0x8000) | (_deltas(sp).to(torch.int32) << 11) | (off << 7) | (b & 0x7F)
    entries = torch.where(word >= 0x8000, word - 0x10000, word).to(torch.int16).reshape(-1)
    return DeltaTensor(entries, base.to(torch.uint8), sp.starts, sp.gptr, sp.shape)


def is_compact(sp: DeltaTensor) -> bool:
    return sp.values.dtype == torch.int16


def expand(sp: DeltaTensor) -> DeltaTensor:
    """The plain form (bf16 values, nibble deltas) of a weight in the compact form; a plain one as it is."""
    if not is_compact(sp):
        return sp
    G = sp.groups
    w = sp.values.to(torch.int32).view(G, GROUP) & 0xFFFF
    off = (w >> 7) & 15
    base = sp.deltas.to(torch.int32)[:, None]
    bits = torch.where(off != 0, (w & 0x8000) | ((base + off) << 7) | (w & 0x7F), torch.zeros_like(w))
    values = torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.bfloat16).reshape(-1)
    d = ((w >> 11) & 15).view(G, 2, HALF)
    deltas = (d[:, 0] | (d[:, 1] << 4)).to(torch.uint8).reshape(-1)
    return DeltaTensor(values, deltas, sp.starts, sp.gptr, sp.shape)


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
    sp = expand(sp)
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
    cpt = is_compact(sp)
    if (sp.gptr.numel() != n + 1 or sp.values.numel() != G * GROUP or sp.deltas.numel() != (G if cpt else G * HALF)
            or sp.deltas.dtype != torch.uint8 or k >= MAX_K):
        raise UserError(f"sparse tensor {name} has the wrong sizes for {sp.shape}: the checkpoint is damaged")
    if cpt and G:  # the kernels scale by the float 2^base; a zero offset is the value 0 only with nothing else set
        w = sp.values.to(torch.int32) & 0xFFFF
        if bool((sp.deltas > COMPACT_BASE).any()) or bool(((((w >> 7) & 15) == 0) & ((w & 0x807F) != 0)).any()):
            raise bad
        sp = expand(sp)
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
