"""What bandwidth the one-token delta product leaves on the table: in the per-linear harness (CUDA events, L2 flushed,
median), dense ``F.linear``, the shipped one-token delta op, and two read-only kernels over the same packed bytes:
``read_flat`` (a grid-stride 16-byte stream over values and deltas, the streaming ceiling) and ``read_rows`` (the
op's own access pattern: a warp per row, a persistent grid, 8 groups a step, each lane one 16-byte value load, one
8-byte delta load and the group's start, U steps in flight, with the op's launch settings; the values are only
XOR-ed, no decode and no gathers). If ``read_rows`` is as slow as the op, the access pattern is the limit; if it is
near ``read_flat``, the decode and gathers are.

    python3 bench/probe_stream.py --out $OUT/stream.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sparse_decode import brief, masked, op, shape_list, timeit, write_rows  # noqa: E402

from layerprune.sparse import delta_cuda  # noqa: E402
from layerprune.sparse.delta import pack  # noqa: E402

# appended to delta_cuda's source (its typedefs and its load_step, the op's own loads)
SRC = r"""
extern "C" __global__ void read_flat(const uint4* __restrict__ p, long long n16, u32* __restrict__ out) {
    u32 acc = 0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + (UF - 1) * stride < n16; i += UF * stride) {
        uint4 q[UF];
#pragma unroll
        for (int u = 0; u < UF; ++u) q[u] = __ldcs(p + i + u * stride);
#pragma unroll
        for (int u = 0; u < UF; ++u) acc ^= q[u].x ^ q[u].y ^ q[u].z ^ q[u].w;
    }
    for (; i < n16; i += stride) { const uint4 q = __ldcs(p + i); acc ^= q.x ^ q.y ^ q.z ^ q.w; }
    if (acc == 0x12345678u) out[0] = acc;  // never, in practice: keeps the loads
}

extern "C" __global__ void read_rows(const u16* __restrict__ vals, const u64* __restrict__ dl,
                                     const u16* __restrict__ starts, const int* __restrict__ gptr,
                                     u32* __restrict__ y, int N) {
    const int tid = threadIdx.x, lane = tid & 31, sub = lane >> 2, part = lane & 3;
    const int nwarps = gridDim.x * (blockDim.x >> 5);
    int r = blockIdx.x * (blockDim.x >> 5) + (tid >> 5);
    int g0 = 0, g1 = 0, n0 = 0, n1 = 0;
    if (r < N) { g0 = gptr[r]; g1 = gptr[r + 1]; }
    int rn = r + nwarps;
    if (rn < N) { n0 = gptr[rn]; n1 = gptr[rn + 1]; }
    uint4 v[U], v2[U];
    u64 w[U], w2[U];
    u32 s[U], s2[U];
    int gb = g0;
    if (gb < g1) load_step(v, w, s, vals, dl, starts, gb, g0, g1, sub, part);
    u32 acc = 0;
    while (r < N) {
        int gn = gb + 8 * U;
        const bool same = gn < g1;
        if (same) load_step(v2, w2, s2, vals, dl, starts, gn, g0, g1, sub, part);
        else if (rn < N && n0 < n1) load_step(v2, w2, s2, vals, dl, starts, n0, n0, n1, sub, part);
        if (gb < g1) {
#pragma unroll
            for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w ^ (u32)w[u] ^ (u32)(w[u] >> 32) ^ s[u];
        }
        if (!same) {
#pragma unroll
            for (int m = 16; m; m >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, m);
            if (lane == 0) y[r] = acc;
            acc = 0;
            r = rn; g0 = n0; g1 = n1; gn = n0;
            rn = r + nwarps;
            if (rn < N) { n0 = gptr[rn]; n1 = gptr[rn + 1]; }
        }
        gb = gn;
#pragma unroll
        for (int u = 0; u < U; ++u) { v[u] = v2[u]; w[u] = w2[u]; s[u] = s2[u]; }
    }
}
"""


def kernel(name: str, u: int, uf: int = 4):
    return torch.cuda._compile_kernel(delta_cuda.source(u, 1) + f"#define UF {uf}\n" + SRC, name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="8192x8192,28672x8192,8192x28672,4096x4096")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    sms, _ = delta_cuda._props(0)
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    rows = []
    for n, k in shape_list(a.shapes):
        w = masked(n, k, a.sparsity)
        sp = pack(w)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        flat = torch.cat([sp.values.view(torch.uint8), sp.deltas.view(torch.uint8)])
        flat = flat[: flat.numel() // 16 * 16]
        sink = torch.zeros(max(n, 1), dtype=torch.int32, device="cuda")
        row = {"shape": [n, k], "sparsity": a.sparsity, "packed_bytes": sp.nbytes(),
               "dense_us": timeit(lambda: F.linear(x, w), a.reps), "delta_op_us": timeit(lambda: op(x, sp, n, k), a.reps)}
        for uf in (2, 4, 8):
            kf = kernel("read_flat", 1, uf)
            for per_sm, threads in ((4, 256), (8, 256), (2, 1024)):
                row[f"flat_uf{uf}_g{per_sm}x{threads}_us"] = timeit(
                    lambda: _flat(kf, flat, sink, sms * per_sm, threads, stream()), a.reps)
        u0, w0, b0 = delta_cuda.settings(n, k, 1)
        for u, warps, per_sm in {(u0, w0, b0), (1, w0, b0), (4, w0, b0), (2, 16, 0), (2, 8, 4), (2, 4, 8), (4, 16, 2)}:
            kr = kernel("read_rows", u)
            grid = min(sms * per_sm, -(-n // warps)) if per_sm else -(-n // warps)
            row[f"rows_u{u}_w{warps}_g{per_sm}_us"] = timeit(lambda: delta_cuda._launch(
                kr, (grid, 1), 32 * warps, 0, stream(), (sp.values, sp.deltas, sp.starts, sp.gptr, sink), (n,)), a.reps)
        row["op_settings"] = [u0, w0, b0]
        row["flat_best_us"] = min(v for key, v in row.items() if key.startswith("flat_"))
        row["rows_best_us"] = min(v for key, v in row.items() if key.startswith("rows_"))
        row["flat_TBps"] = row["packed_bytes"] / row["flat_best_us"] / 1e6
        row["op_TBps"] = row["packed_bytes"] / row["delta_op_us"] / 1e6
        row["dense_TBps"] = 2 * n * k / row["dense_us"] / 1e6
        rows.append(row)
        brief(row)
        write_rows(a.out, rows=rows)


def _flat(kf, flat, sink, grid, threads, stream):
    import ctypes

    args = [ctypes.c_void_p(flat.data_ptr()), ctypes.c_longlong(flat.numel() // 16), ctypes.c_void_p(sink.data_ptr())]
    argv = (ctypes.c_void_p * 3)(*(ctypes.addressof(v) for v in args))
    rc = delta_cuda._launcher()(kf.func, grid, 1, 1, threads, 1, 1, 0, stream, argv, None)
    assert rc == 0


if __name__ == "__main__":
    main()
