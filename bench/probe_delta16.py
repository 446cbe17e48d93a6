"""A 16-bit word per nonzero for the one-token delta kernel: does streaming 17% fewer bytes make it faster?

The ``delta`` layout spends 2.5 bytes a nonzero (a bf16 value and a 4-bit column delta) plus a 16-bit start per
group of 32. ``bench/probe_exponents.py`` found the kept values of pruned real models within 15 binades below
their row's largest exponent. Here each entry becomes one 16-bit word, ``delta:4 | exponent offset:4 | sign:1 |
mantissa:7``, with the group's base exponent beside its start (one 32-bit word a group). Offset 15 means exponent
field 0 (zeros, fillers and subnormals), so the decode is exact, and a group whose nonzeros span more binades cannot
be packed (counted, not timed). A second form (``scaled``) keeps the float's own bit positions: ``sign:1 | delta:4
| exponent − base + 15:4 | mantissa:7``, so the word masked is an fp32 that one multiply by the group's 2^(base − 15)
makes exact (two operations a value instead of about eight). A copy of the shipped one-token kernel (``delta_spmv_bf16``, one token a pass,
the same loads pipelined, the same prefix sums, the same launch settings) reads the words instead: one 16-byte
load a lane per step where the shipped kernel makes two (values, deltas).

Per shape, with the weight masked by magnitude per row (Wanda-like; ``--sparsity``), bf16, L2 flushed, median µs
in one run: dense ``F.linear``, the shipped op (``delta_cuda.spmv``), this kernel; its output must equal the
shipped kernel's bit for bit (the same products in the same order).

    python3 bench/probe_delta16.py --out $OUT/delta16.json [--shapes 8192x8192,...] [--check-only]

``--check-only`` (the CPU) packs and decodes in PyTorch and checks the round trip, without the kernel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layerprune.sparse import delta  # noqa: E402

SHAPES = "8192x8192,10240x8192,28672x8192,8192x28672,4096x4096,12288x4096,11008x4096,4096x11008,22016x4096"

KERNEL = r"""
__device__ __forceinline__ int slot16(int c, int skw) { return c + (c >> 4) * skw; }

__device__ __forceinline__ void load16(uint4* v, u32* s, const u16* __restrict__ words, const u32* __restrict__ sb,
                                       int gb, int g0, int g1, int sub, int part) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int g = gb + u * 8 + sub;
        const int gc = g < g1 ? g : g0;
        v[u] = __ldcs(reinterpret_cast<const uint4*>(words) + (size_t)gc * 4 + part);
        s[u] = sb[gc];
    }
}

// acc += the step's products: lane (sub, part) holds entries 8·part … 8·part + 7 of group gb + u·8 + sub
__device__ __forceinline__ void step16(float& acc, const uint4* v, const u32* s, const u16* xs, int gb, int g1,
                                       int sub, int part, int skw) {
    const unsigned long long LO = 0x0F0F0F0F0F0F0F0FULL, ONE = 0x0101010101010101ULL;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const u32 hlo = __byte_perm(v[u].x, v[u].y, 0x7531), hhi = __byte_perm(v[u].z, v[u].w, 0x7531);
        const u32 slo = __byte_perm(v[u].x, v[u].y, 0x6420), shi = __byte_perm(v[u].z, v[u].w, 0x6420);
        const unsigned long long hb = (unsigned long long)hlo | ((unsigned long long)hhi << 32);
#if SCALED
        const unsigned long long p = (((hb >> 3) & LO) + ONE) * ONE;
#else
        const unsigned long long p = (((hb >> 4) & LO) + ONE) * ONE;
#endif
        const int tot = (int)(p >> 56);
        int c = __shfl_up_sync(0xffffffffu, tot, 1, 4);
        c = part >= 1 ? c : 0;
        const int c2 = __shfl_up_sync(0xffffffffu, c + tot, 2, 4);
        c += part >= 2 ? c2 : 0;
        const int base = (int)(s[u] & 0xFFFFu) - 1 + c;
        float a = 0.f;
#if SCALED
        const float scale = __uint_as_float(((s[u] >> 16) & 0xFFu) << 23);
        const u32 q[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int col = slot16(base + (int)((p >> (8 * j)) & 0xFF), skw);
            const u32 bits = ((j & 1) ? q[j >> 1] : q[j >> 1] << 16) & 0x87FF0000u;
            const float wv = __uint_as_float(bits) * scale;
            a += wv * bf(xs[col]);
        }
#else
        const u32 be = (s[u] >> 16) & 0xFFu;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int col = slot16(base + (int)((p >> (8 * j)) & 0xFF), skw);
            const u32 sm = ((j < 4 ? slo : shi) >> (8 * (j & 3))) & 0xFFu;
            const u32 off = (u32)(hb >> (8 * j)) & 0xFu;
            const u32 ex = off == 15u ? 0u : be - off;
            const float wv = __uint_as_float(((sm & 0x80u) << 24) | (ex << 23) | ((sm & 0x7Fu) << 16));
            a += wv * bf(xs[col]);
        }
#endif
        const bool ok = gb + u * 8 + sub < g1;
        acc += ok ? a : 0.f;
    }
}

extern "C" __global__ void delta16_spmv_bf16(const u16* __restrict__ x, const u16* __restrict__ words,
                                             const u32* __restrict__ sb, const int* __restrict__ gptr,
                                             u16* __restrict__ y, int N, int K, int vec, int skw)
{
    extern __shared__ __align__(16) u16 xs[];
    const int tid = threadIdx.x, nt = blockDim.x;
    const int lane = tid & 31, sub = lane >> 2, part = lane & 3;
    const int nwarps = gridDim.x * (nt >> 5);
    int r = blockIdx.x * (nt >> 5) + (tid >> 5);
    int g0 = 0, g1 = 0, n0 = 0, n1 = 0;
    if (r < N) { g0 = gptr[r]; g1 = gptr[r + 1]; }
    int rn = r + nwarps;
    if (rn < N) { n0 = gptr[rn]; n1 = gptr[rn + 1]; }
    uint4 v[U], v2[U];
    u32 s[U], s2[U];
    int gb = g0;
    if (gb < g1) load16(v, s, words, sb, gb, g0, g1, sub, part);
    if (vec) {
        const uint4* x4 = reinterpret_cast<const uint4*>(x);
        for (int i = tid; i < (K >> 3); i += nt) {
            const uint4 q = x4[i];
            u32* d = reinterpret_cast<u32*>(xs + slot16(8 * i, skw));
            d[0] = q.x; d[1] = q.y; d[2] = q.z; d[3] = q.w;
        }
        for (int i = (K & ~7) + tid; i < K; i += nt) xs[slot16(i, skw)] = x[i];
    } else {
        for (int i = tid; i < K; i += nt) xs[slot16(i, skw)] = x[i];
    }
    for (int i = K + tid; i < K + PAD; i += nt) xs[slot16(i, skw)] = 0;
    __syncthreads();
    float acc = 0.f;
    while (r < N) {
        int gn = gb + 8 * U;
        const bool same = gn < g1;
        if (same) load16(v2, s2, words, sb, gn, g0, g1, sub, part);
        else if (rn < N && n0 < n1) load16(v2, s2, words, sb, n0, n0, n1, sub, part);
        if (gb < g1) step16(acc, v, s, xs, gb, g1, sub, part, skw);
        if (!same) {
            float o = acc;
#pragma unroll
            for (int m = 16; m; m >>= 1) o += __shfl_xor_sync(0xffffffffu, o, m);
            acc = 0.f;
            if (lane == 0) y[r] = to_bf(o);
            r = rn; g0 = n0; g1 = n1; gn = n0;
            rn = r + nwarps;
            if (rn < N) { n0 = gptr[rn]; n1 = gptr[rn + 1]; }
        }
        gb = gn;
#pragma unroll
        for (int u = 0; u < U; ++u) { v[u] = v2[u]; s[u] = s2[u]; }
    }
}
"""


def pack16(dt: delta.DeltaTensor, scaled: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(words int16 (G·32,), group words int32 (G,), groups that do not fit) of a bf16 delta-packed weight.
    ``scaled``: the second form, ``sign:1 | delta:4 | exponent − base + 15:4 | mantissa:7`` with 2^(base − 15) as
    the group's fp32 exponent field beside its start: the word masked is a float the kernel multiplies by that
    power of two (exact; zero stays zero; a nonzero subnormal or one 15 binades below the base does not fit)."""
    g = dt.starts.numel()
    bits = dt.values.view(torch.int16).to(torch.int32).view(g, 32) & 0xFFFF
    d = dt.deltas.view(g, 16).to(torch.int32)
    dl = torch.cat([d & 15, d >> 4], 1)  # entry b < 16: low nibble of byte b; entry 16 + b: its high nibble
    e = (bits >> 7) & 0xFF
    base = e.max(1).values
    nz = e > 0
    if scaled:
        rel = torch.where(nz, e - base[:, None] + 15, torch.zeros_like(e))
        bad = int((((rel < 1) & nz) | ((e == 0) & ((bits & 0x7F) != 0))).any(1).sum())
        word = ((bits >> 15) << 15) | (dl << 11) | ((rel & 15) << 7) | (bits & 0x7F)
        scale_field = torch.where(base > 0, base + 112, torch.full_like(base, 127))  # an all-zero group: 1.0
        sb = ((dt.starts.to(torch.int32) & 0xFFFF) | (scale_field << 16)).contiguous()
    else:
        off = torch.where(nz, base[:, None] - e, torch.full_like(e, 15))
        bad = int(((off > 14) & nz).any(1).sum())
        sm = ((bits >> 8) & 0x80) | (bits & 0x7F)
        word = (dl << 12) | ((off & 15) << 8) | sm
        sb = ((dt.starts.to(torch.int32) & 0xFFFF) | (base << 16)).contiguous()
    words = torch.where(word >= 32768, word - 65536, word).to(torch.int16).reshape(-1)
    return words, sb, bad


def unpack16_ref(words: torch.Tensor, sb: torch.Tensor, gptr: torch.Tensor, shape: tuple[int, int],
                 scaled: bool = False) -> torch.Tensor:
    """The dense weight from the words, in PyTorch (the decode the kernel does, then the delta layout's unpack)."""
    w = words.to(torch.int32) & 0xFFFF
    g = sb.numel()
    w = w.view(g, 32)
    if scaled:
        dl = (w >> 11) & 15
        f32 = ((w & 0x87FF) << 16).to(torch.int32).view(torch.float32)
        scale = (((sb >> 16) & 0xFF) << 23).to(torch.int32).view(torch.float32)
        vals = (f32 * scale[:, None]).to(torch.bfloat16).reshape(-1)
    else:
        dl, off, sm = w >> 12, (w >> 8) & 15, w & 0xFF
        base = (sb >> 16) & 0xFF
        ex = torch.where(off == 15, torch.zeros_like(off), base[:, None] - off)
        bits = ((sm & 0x80) << 8) | (ex << 7) | (sm & 0x7F)
        vals = torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16).view(torch.bfloat16).reshape(-1)
    deltas = (dl[:, :16] | (dl[:, 16:] << 4)).to(torch.uint8).reshape(-1)
    starts = (sb & 0xFFFF)
    starts = torch.where(starts >= 32768, starts - 65536, starts).to(torch.int16)
    return delta.unpack(delta.DeltaTensor(vals, deltas, starts, gptr, shape))


def magnitude_masked(n: int, k: int, sparsity: float, dev) -> torch.Tensor:
    """A random bf16 weight with the smallest ``sparsity`` of each row's magnitudes zeroed (as Wanda keeps the large
    scores within a row)."""
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    drop = int(k * sparsity)
    thr = w.abs().float().kthvalue(drop, dim=1, keepdim=True).values
    return w.masked_fill(w.abs().float() <= thr, 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--check-only", action="store_true")
    a = ap.parse_args()
    dev = torch.device("cpu" if a.check_only else "cuda")
    res = {"torch": torch.__version__, "sparsity": a.sparsity, "rows": []}
    if a.check_only:
        torch.manual_seed(0)
        for n, k in ((64, 200), (33, 1000)):
            for w, sub in ((magnitude_masked(n, k, a.sparsity, dev), False), (magnitude_masked(n, k, a.sparsity, dev), True),
                           (torch.randn(n, k, dtype=torch.bfloat16).masked_fill(torch.rand(n, k) < a.sparsity, 0), True)):
                w[3] = 0  # an empty row
                if sub:  # subnormals: the offset form keeps them, the scaled form refuses their groups
                    w[5, ::7] = torch.tensor(1e-39, dtype=torch.bfloat16)
                dt = delta.pack(w)
                for scaled in (False, True):
                    words, sb, bad = pack16(dt, scaled)
                    row = {"shape": [n, k], "subnormals": sub, "scaled": scaled, "groups": dt.starts.numel(),
                           "groups_not_fitting": bad}
                    if not bad:
                        row["exact"] = bool(torch.equal(unpack16_ref(words, sb, dt.gptr, (n, k), scaled), w))
                    res["rows"].append(row)
                    print(row)
        Path(a.out).write_text(json.dumps(res, indent=1))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sparse_decode import timeit

    from layerprune.sparse import delta_cuda

    res["device"] = torch.cuda.get_device_name(0)
    sms, limit = delta_cuda._props(0)
    kerns = {}
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        w = magnitude_masked(n, k, a.sparsity, dev)
        dt = delta.pack(w)
        packed = {form: pack16(dt, form == "scaled") for form in ("offset", "scaled")}
        row = {"shape": [n, k], "groups_not_fitting": {f: v[2] for f, v in packed.items()},
               "delta_mb": (dt.values.numel() * 2 + dt.deltas.numel() + dt.starts.numel() * 2) / 2**20,
               "delta16_mb": (packed["offset"][0].numel() * 2 + packed["offset"][1].numel() * 4) / 2**20}
        if any(v[2] for v in packed.values()):
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            continue
        unroll, warps, per_sm = delta_cuda.settings(n, k, 1)
        for form in packed:
            if (unroll, form) not in kerns:
                src = (delta_cuda.PRELUDE + f"#define U {unroll}\n#define PAD {delta_cuda.PAD}\n"
                       f"#define SCALED {int(form == 'scaled')}\n" + KERNEL)
                kerns[unroll, form] = torch.cuda._compile_kernel(src, "delta16_spmv_bf16",
                                                                 nvcc_options=["--use_fast_math"])
        skw = delta_cuda.skew(1)
        smem = delta_cuda.smem_bytes(k, 1, skw)
        rows_grid = -(-n // warps)
        grid = min(sms * per_sm, rows_grid) if per_sm else rows_grid
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)

        def runner(form):
            kern, (words, sb, _) = kerns[unroll, form], packed[form]

            def run16():
                y = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
                delta_cuda._launch(kern, (grid, 1), 32 * warps, smem, delta_cuda.cur_stream(0),
                                   (x, words, sb, dt.gptr, y), (n, k, int(x.data_ptr() % 16 == 0), skw))
                return y
            return run16

        def shipped():
            return delta_cuda.spmv(x, dt.values, dt.deltas, dt.starts, dt.gptr, n, k)

        ys = shipped()
        ref = F.linear(x, w).float()
        row["dense_us"] = timeit(lambda: F.linear(x, w), a.reps)
        row["delta_us"] = timeit(shipped, a.reps)
        for form in packed:
            fn = runner(form)
            y16 = fn()
            row[f"{form}_equal_to_shipped"] = bool(torch.equal(y16, ys))
            row[f"{form}_max_rel_err"] = float((y16.float() - ref).abs().max() / ref.abs().max())
            row[f"{form}_us"] = timeit(fn, a.reps)
        row["delta_again_us"] = timeit(shipped, a.reps)
        row["delta_speedup"] = row["dense_us"] / min(row["delta_us"], row["delta_again_us"])
        for form in packed:
            row[f"{form}_speedup"] = row["dense_us"] / row[f"{form}_us"]
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
