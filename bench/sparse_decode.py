"""Sparse inference on the GPU: per-linear kernel times vs F.linear (both layouts: ``delta``, the default, and
``bitmask``), the break-even sparsity of each, and end-to-end decode tokens/s of a LLaMA-2-7B-dims model
pruned by layerprune (Wanda + DLP, 70%), dense vs sparse.

    python bench/sparse_decode.py --out $OUT/sparse_decode_h200.json [--parts linears,breakeven,e2e]
    python bench/sparse_decode.py --out $OUT/m.json --parts merged --batches 1,4,16   # q/k/v, gate/up stacked

Per linear: CUDA events around the call only, L2 flushed (a 512 MiB buffer zeroed) before each call,
median of --reps calls, dense and sparse interleaved in one run. cuSPARSELt 2:4
(``to_sparse_semi_structured``) is timed as a second reference where PyTorch offers it, as eager calls: each sets up
cuSPARSELt's plan on the host, which these figures include (``bench/probe_cslt.py --graphs`` times its kernels alone,
replayed from a CUDA graph: BENCHMARKS.md, session 26). bf16 throughout.
End to end: random bf16 weights with LLaMA-2-7B dimensions built on the GPU, calibrated on random token
ids (speed does not depend on the values), pruned by ``layerprune.prune`` (Wanda, DLP at 70%), decoded
with a static KV cache and one CUDA-graph-captured step (``layerprune.sparse.bench.decode_rate``). The end-to-end
``sparse_tok_s`` is the sparse model as ``generate`` and ``bench-decode`` run it, with q/k/v and gate/up stacked
(``layerprune.sparse.merge``); ``unmerged_tok_s`` keeps them apart and ``dense_merged_tok_s`` stacks the dense
model the same way.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layerprune.pruners.masks import nm_mask  # noqa: E402
from layerprune.sparse import delta_kernels, kernels  # noqa: E402
from layerprune.sparse.delta import DeltaTensor, pack  # noqa: E402
from layerprune.sparse.linear import nm24_cslt_wanted, nm24_kernel_wanted, pack_as  # noqa: E402
from layerprune.sparse.nm24 import NM24Tensor  # noqa: E402

DEV = torch.device("cuda")
SHAPES = {"llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
          "llama3-8b": [(1024, 4096), (14336, 4096), (4096, 14336)],
          "llama2-70b": [(8192, 8192), (28672, 8192), (8192, 28672)]}
FLUSH = None


def timeit(fn, reps: int, spin: int = 300_000) -> float:
    """Median µs of ``fn()`` over ``reps`` calls, L2 flushed before each. After the flush the GPU spins
    ~150 µs (``torch.cuda._sleep``) before the start event, so that the CPU has enqueued ``fn``'s kernels by
    then: the custom op's Python dispatch alone takes ~100 µs on the H200 machine's CPU, and without the
    spin a launch that fell behind the flush was timed as GPU time (session 14: some rows at 0.4× that
    measured 1.3× when the launch kept up). ``spin``: GPU cycles to spin (more for a ``fn`` of several ops)."""
    global FLUSH
    if FLUSH is None:
        FLUSH = torch.empty(512 * 2**20, dtype=torch.uint8, device=DEV)
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        FLUSH.zero_()
        torch.cuda._sleep(spin)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000)
    return statistics.median(ts)


def emit(rows: list[dict], row: dict, on_row=None) -> None:
    """Append ``row``, print it, and hand the rows so far to ``on_row`` (written as it goes: a run cut short keeps
    its rows)."""
    rows.append(row)
    print(json.dumps(row), flush=True)
    if on_row is not None:
        on_row(rows)


def masked(n: int, k: int, sparsity: float | str) -> torch.Tensor:
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
    if sparsity == "2:4":
        return w.masked_fill(nm_mask(w.abs().float(), 2, 4), 0)
    return w.masked_fill(torch.rand(n, k, device=DEV) < sparsity, 0)


def variant_row(x: torch.Tensor, w: torch.Tensor, variants: dict, reps: int, **fields) -> dict:
    """One row of a side-by-side run: dense ``F.linear`` and each variant (name → callable) in µs, each with its
    max relative error against dense, and the fastest variant with its speed-up."""
    ref = F.linear(x, w).float()
    row = dict(fields, dense_us=timeit(lambda: F.linear(x, w), reps))
    for name, fn in variants.items():
        row[name + "_err"] = float((fn().float() - ref).abs().max() / ref.abs().max())
        row[name] = timeit(fn, reps)
    best = min((row[name], name) for name in variants)
    row["best"], row["best_speedup"] = best[1], row["dense_us"] / best[0]
    return row


def one_token_cases(shapes: str, sparsities: str):
    """For each shape × sparsity of the side-by-side benches: (n, k, sparsity, the masked bf16 weight, its delta
    packing, one bf16 token)."""
    for n, k in shape_list(shapes):
        for s in (v if v == "2:4" else float(v) for v in sparsities.split(",")):
            w = masked(n, k, s)
            yield n, k, s, w, pack(w), torch.randn(1, k, device=w.device, dtype=torch.bfloat16)


def shape_list(text: str) -> list[tuple[int, int]]:
    """``"4096x4096,11008x4096"`` → [(4096, 4096), (11008, 4096)] (N × K)."""
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]


def brief(row: dict, *keys: str) -> None:
    """One JSON line of the row's ``keys`` (all but the error fields when none are named), floats rounded."""
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                      if (k in keys if keys else not k.endswith("_err"))}), flush=True)


def write_rows(path: str | Path, **parts) -> None:
    """A side-by-side bench's JSON: the device, torch and Triton versions, bf16, and ``parts`` (row lists)."""
    import triton

    Path(path).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                      "triton": triton.__version__, "dtype": "bfloat16", **parts}, indent=1))


def op(x, sp, n, k):
    if isinstance(sp, DeltaTensor):
        return torch.ops.layerprune.sparse_linear_delta(x, sp.values, sp.deltas, sp.starts, sp.gptr, n, k)
    if isinstance(sp, NM24Tensor):
        return torch.ops.layerprune.sparse_linear_nm24(x, sp.values, sp.meta, n, k)
    return torch.ops.layerprune.sparse_linear(x, sp.bitmask, sp.values, sp.offsets, n, k, sp.bn, sp.bk)


def delta_path(b: int, k: int) -> str:
    """The op's path for ``b`` tokens of a bf16 delta weight with ``k`` inputs on a CUDA device."""
    if b <= delta_kernels.CUDA_BATCH:
        return "cuda-kernel"
    wide = b <= delta_kernels.MMA_WIDE_BATCH and k > delta_kernels.WIDE_MMA_K
    return "cuda-tile-kernel" if b <= delta_kernels.MMA_BATCH or wide else "unpack+cuBLAS"


def linears(reps: int, batches: list[int], sparsities: list, on_row=None) -> list[dict]:
    rows = []
    for model, shapes in SHAPES.items():
        for (n, k) in shapes:
            for s in sparsities:
                w = masked(n, k, s)
                sp, bsp = pack_as(w, "delta"), pack_as(w, "bitmask")
                cusp = nsp = None
                if s == "2:4":
                    nsp = pack_as(w, "nm24")
                    try:
                        from torch.sparse import to_sparse_semi_structured

                        cusp = to_sparse_semi_structured(w)
                    except Exception as e:  # noqa: BLE001
                        print("cuSPARSELt unavailable:", e, file=sys.stderr)
                for b in batches:
                    x = torch.randn(b, k, device=DEV, dtype=torch.bfloat16)
                    y_ref = F.linear(x, w)
                    err = float((op(x, sp, n, k).float() - y_ref.float()).abs().max() / y_ref.float().abs().max())
                    err_b = float((op(x, bsp, n, k).float() - y_ref.float()).abs().max() / y_ref.float().abs().max())
                    d = timeit(lambda: F.linear(x, w), reps)
                    sps = timeit(lambda: op(x, sp, n, k), reps)
                    bms = timeit(lambda: op(x, bsp, n, k), reps)
                    row = {"model": model, "shape": [n, k], "sparsity": s, "batch": b, "dense_us": d, "sparse_us": sps,
                           "speedup": d / sps, "layout": "delta", "rel_err": err, "sparse_bytes": sp.nbytes(),
                           "dense_bytes": w.numel() * 2, "bitmask_us": bms, "bitmask_speedup": d / bms,
                           "bitmask_rel_err": err_b, "bitmask_bytes": bsp.nbytes(),
                           "path": delta_path(b, k),
                           "bitmask_path": "decode-kernel" if b <= kernels.SMALL_BATCH else "decompress+cuBLAS"}
                    if nsp is not None:  # the nm24 layout (2:4 weights only): sparse tensor cores
                        row["nm24_rel_err"] = float((op(x, nsp, n, k).float() - y_ref.float()).abs().max()
                                                    / y_ref.float().abs().max())
                        row["nm24_us"] = timeit(lambda: op(x, nsp, n, k), reps)
                        row["nm24_speedup"], row["nm24_bytes"] = d / row["nm24_us"], nsp.nbytes()
                        row["nm24_path"] = ("mma.sp-kernel" if nm24_kernel_wanted(b, n, k) else
                                            "cuSPARSELt" if nm24_cslt_wanted(b, n, k) else "unpack+cuBLAS")
                    if cusp is not None:
                        try:
                            row["cusparselt_us"] = timeit(lambda: F.linear(x, cusp), reps) if b >= 16 else None
                        except Exception as e:  # noqa: BLE001
                            row["cusparselt_error"] = str(e)[:100]
                    emit(rows, row, on_row)
                del w, sp, bsp, cusp, nsp
    return rows


GROUPS = {"llama2-7b": {"qkv": [4096, 4096, 4096], "gate_up": [11008, 11008], "k": [4096, 4096]},
          "llama3-8b": {"qkv": [4096, 1024, 1024], "gate_up": [14336, 14336], "k": [4096, 4096]},
          "llama2-70b": {"qkv": [8192, 1024, 1024], "gate_up": [28672, 28672], "k": [8192, 8192]}}


def merged_linears(reps: int, batches: list[int], sparsity: float = 0.7, on_row=None) -> list[dict]:
    """The linears that read one input (q/k/v, gate/up), one after another against stacked into one
    (``layerprune.sparse.merge``), dense and sparse, each variant timed as a whole after one L2 flush."""
    from layerprune.sparse.merge import cat_delta

    rows = []
    for model, g in GROUPS.items():
        for (name, sizes), k in zip([("qkv", g["qkv"]), ("gate_up", g["gate_up"])], g["k"]):
            ws = [masked(n, k, sparsity) for n in sizes]
            sps = [pack(w) for w in ws]
            wm, spm = torch.cat(ws), cat_delta(sps)
            nm = sum(sizes)
            for b in batches:
                x = torch.randn(b, k, device=DEV, dtype=torch.bfloat16)
                y_ref = F.linear(x, wm)
                err = float((op(x, spm, nm, k).float() - y_ref.float()).abs().max() / y_ref.float().abs().max())
                spin = 1_200_000  # ≈ 0.6 ms: three ops' dispatch is enqueued before the start event
                t = {"dense_apart_us": timeit(lambda: [F.linear(x, w) for w in ws], reps, spin),
                     "dense_merged_us": timeit(lambda: F.linear(x, wm), reps, spin),
                     "sparse_apart_us": timeit(lambda: [op(x, s, w.shape[0], k) for s, w in zip(sps, ws)], reps, spin),
                     "sparse_merged_us": timeit(lambda: op(x, spm, nm, k), reps, spin)}
                row = {"model": model, "group": name, "shapes": [[n, k] for n in sizes], "sparsity": sparsity,
                       "batch": b, **t, "rel_err": err,
                       "speedup_apart": t["dense_apart_us"] / t["sparse_apart_us"],
                       "speedup_merged_vs_dense_apart": t["dense_apart_us"] / t["sparse_merged_us"],
                       "speedup_merged_vs_dense_merged": t["dense_merged_us"] / t["sparse_merged_us"]}
                emit(rows, row, on_row)
            del ws, sps, wm, spm
    return rows


def breakeven(reps: int, sparsities: tuple[float, ...] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75)) -> list[dict]:
    rows = []
    for (n, k) in [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)]:
        for s in sparsities:
            w = masked(n, k, s)
            x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16)
            for layout in ("delta", "bitmask"):
                sp = pack_as(w, layout)
                d = timeit(lambda: F.linear(x, w), reps)
                sps = timeit(lambda: op(x, sp, n, k), reps)
                rows.append({"shape": [n, k], "sparsity": s, "batch": 1, "layout": layout, "dense_us": d,
                             "sparse_us": sps, "speedup": d / sps})
                print(json.dumps(rows[-1]), flush=True)
    return rows


E2E_DIMS = {"llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=32),
            "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
            "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                               num_key_value_heads=8)}


def random_model(dims: str, smoke: bool = False, blocks: int = 0, max_pos: int = 4096):
    """(model, config): random bf16 weights with ``dims``' dimensions (``blocks`` of its blocks when given) built on
    DEV, eval mode; ``smoke``: tiny dimensions (a CPU check of the code path)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    dcfg = dict(E2E_DIMS[dims])
    if blocks:  # a part of the model's blocks (70B: 16 of 80 fit twice on one GPU with the sparse copies)
        dcfg["num_hidden_layers"] = blocks
    dcfg.setdefault("vocab_size", 32000)  # LLaMA-2's; Llama-3's 128256 (its dense lm_head is 1 GB read per step)
    cfg = LlamaConfig(**dcfg, max_position_embeddings=max_pos)
    if smoke:
        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=32000, max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    return model, cfg


def masked_pair(layers: int = 32, sparsity: float = 0.7, merge: bool = False):
    """(dense, sparse): LLaMA-2-7B dims with ``layers`` blocks (random bf16 on DEV, ``use_cache`` on), every block
    linear masked at random to ``sparsity``, and its ``sparsify``'d copy; with ``merge`` q/k/v and gate/up stacked in
    both (as ``generate`` runs them). For the probes that compare one dense and one sparse model."""
    from layerprune.sparse.export import sparsify
    from layerprune.sparse.merge import merge_siblings

    dense, _ = random_model("llama2-7b", blocks=layers)
    dense.config.use_cache = True
    with torch.no_grad():
        for blk in dense.model.layers:
            for lin in (m for m in blk.modules() if isinstance(m, torch.nn.Linear)):
                lin.weight.masked_fill_(torch.rand(lin.weight.shape, device=lin.weight.device) < sparsity, 0)
    sparse = copy.deepcopy(dense)
    sparsify(sparse)
    if merge:
        merge_siblings(sparse)
        merge_siblings(dense)
    return dense, sparse


def random_session(model, nsamples: int, seqlen: int):
    """A pruning session calibrated on random token ids (speed does not depend on the values)."""
    from layerprune.api import Session
    from layerprune.data.calibration import CalibSet

    sess = Session(model, None, DEV, nsamples=nsamples, seqlen=seqlen, batch_size=8, progress=False, use_cache=False)
    ids = torch.randint(0, 32000, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    sess._calib = CalibSet(ids, "random", 0, list(range(nsamples)))
    return sess


def e2e(batches: list[int], new_tokens: int, nsamples: int, seqlen: int, smoke: bool = False,
        dims: str = "llama2-7b", blocks: int = 0, compile: bool = False, on_row=None,
        prefill: list[int] = ()) -> list[dict]:
    from layerprune.api import prune
    from layerprune.sparse import linear
    from layerprune.sparse.bench import decode_rate, prefill_ms, weight_bytes
    from layerprune.sparse.export import sparsify
    from layerprune.sparse.merge import merge_siblings

    t = time.perf_counter()
    model, cfg = random_model(dims, smoke, blocks, max(4096, *prefill) if prefill else 4096)
    build_s = time.perf_counter() - t
    sess = random_session(model, nsamples, seqlen)
    t = time.perf_counter()
    rec = prune(model, session=sess, sparsity=0.7, pruner="wanda", allocation="dlp", eval=[], progress=False,
                device=DEV.type)
    prune_s = time.perf_counter() - t
    model.to(DEV)
    model.config.use_cache = True
    profile = rec["per_block"]
    sparse = copy.deepcopy(model)
    t = time.perf_counter()
    layers = sparsify(sparse)  # delta layout; layers under its measured break-even stay dense
    pack_s = time.perf_counter() - t
    packed_all = copy.deepcopy(model)
    sparsify(packed_all, 0.0)  # every linear packed: the smallest weights
    bitmask = copy.deepcopy(model)
    sparsify(bitmask, layout="bitmask")  # the bitmask layout, layers under its break-even dense
    merged = copy.deepcopy(sparse)
    n_merged = len(merge_siblings(merged))  # q/k/v and gate/up stacked (what generate / bench-decode run)
    dense_merged = copy.deepcopy(model)
    merge_siblings(dense_merged)  # the dense reference stacked the same way
    x = torch.randint(0, 32000, (1, 16), device=DEV)
    with torch.no_grad():
        diff = float((sparse(x).logits.float() - model(x).logits.float()).abs().max())
        merged_diff = float((merged(x).logits.float() - sparse(x).logits.float()).abs().max())
        scale = float(model(x).logits.float().abs().max())
    rows = []
    for b in batches:
        g = DEV.type == "cuda"
        d, mode_d = decode_rate(model, b, 32, new_tokens, g, vocab_hi=32000, compile=compile)
        s, mode_s = decode_rate(sparse, b, 32, new_tokens, g, vocab_hi=32000, compile=compile)
        sm, _ = decode_rate(merged, b, 32, new_tokens, g, vocab_hi=32000, compile=compile)
        dm, _ = decode_rate(dense_merged, b, 32, new_tokens, g, vocab_hi=32000, compile=compile)
        a, _ = decode_rate(packed_all, b, 32, new_tokens, g, vocab_hi=32000, compile=compile)
        bm, _ = decode_rate(bitmask, b, 32, new_tokens, g, vocab_hi=32000, compile=compile)
        name = f"{'smoke (tiny dims)' if smoke else dims + '-dims'}, {cfg.num_hidden_layers} blocks (random bf16, Wanda+DLP 70%)"
        emit(rows, {"model": name, "sparsity": 0.7, "batch": b,
                     "dense_tok_s": d, "sparse_tok_s": sm, "speedup": sm / d, "layout": "delta", "merged": True,
                     "unmerged_tok_s": s, "unmerged_speedup": s / d, "dense_merged_tok_s": dm,
                     "speedup_vs_dense_merged": sm / dm,
                     "all_packed_tok_s": a, "all_packed_speedup": a / d, "bitmask_tok_s": bm,
                     "bitmask_speedup": bm / d, "mode": f"{mode_d}/{mode_s}"}, on_row)
    pre = []
    for t in prefill:  # one sequence's prefill (time to the first token), eager, as bench-decode --prefill-tokens
        d, sm, dm = (prefill_ms(m, t, vocab_hi=32000) for m in (model, merged, dense_merged))
        pre.append({"tokens": t, "dense_ms": d, "sparse_ms": sm, "dense_merged_ms": dm, "speedup": d / sm,
                    "speedup_vs_dense_merged": dm / sm})
        print(json.dumps(pre[-1]), flush=True)
    info = {"prefill": pre, "build_s": build_s, "prune_s": prune_s, "pack_s": pack_s, "per_block": profile,
            "achieved": rec["sparsity"]["achieved"], "timing": rec["timing"], "logit_max_abs_diff": diff,
            "logit_max_abs": scale, "merged_vs_unmerged_logit_max_abs_diff": merged_diff,
            "merged_groups": n_merged, "dense_weight_bytes": weight_bytes(model),
            "sparse_weight_bytes": weight_bytes(sparse), "all_packed_weight_bytes": weight_bytes(packed_all),
            "bitmask_weight_bytes": weight_bytes(bitmask),
            "sparse_layers": sum(v["format"] == "sparse" for v in layers.values()),
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if DEV.type == "cuda" else None}
    return rows, info


def e2e_24(batches: list[int], new_tokens: int, nsamples: int, seqlen: int, smoke: bool = False,
           dims: str = "llama2-7b", on_row=None, prefill: list[int] | None = None,
           blocks: int = 0) -> tuple[list[dict], dict]:
    """End to end for a 2:4 model (``--parts e2e24``): random bf16 weights of ``dims``, Wanda 2:4 (uniform: N:M fixes
    every linear at 50%), packed in the ``nm24`` layout and in ``delta``, q/k/v and gate/up stacked in both (as
    ``generate`` and ``bench-decode`` run them); decode tokens/s against the dense model, CUDA graphs; with
    ``prefill``, one sequence's prefill of each length (``prefill_ms``: eager, the time to the first token); ``blocks``:
    that many of the model's blocks (70B: 16 of 80 fit with the two packed copies and the stacked dense one)."""
    from layerprune.api import prune
    from layerprune.sparse import linear
    from layerprune.sparse.bench import decode_rate, prefill_ms, weight_bytes
    from layerprune.sparse.export import sparsify
    from layerprune.sparse.merge import merge_siblings

    model, cfg = random_model(dims, smoke, blocks, max(4096, *prefill) if prefill else 4096)
    sess = random_session(model, nsamples, seqlen)
    prune(model, session=sess, sparsity=0.5, pattern="2:4", pruner="wanda", allocation="uniform", eval=[],
          progress=False, device=DEV.type)
    model.to(DEV)
    model.config.use_cache = True
    packed = {}
    for layout in ("nm24", "delta"):
        m = copy.deepcopy(model)
        layers = sparsify(m, layout=layout)
        merge_siblings(m)
        packed[layout] = (m, sum(v["format"] == "sparse" for v in layers.values()))
    dense_merged = copy.deepcopy(model)
    merge_siblings(dense_merged)
    x = torch.randint(0, 32000, (1, 16), device=DEV)
    with torch.no_grad():
        ref = model(x).logits.float()
        diffs = {lay: float((m(x).logits.float() - ref).abs().max()) for lay, (m, _) in packed.items()}
        scale = float(ref.abs().max())
    rows = []
    g = DEV.type == "cuda"
    for b in batches:
        d, _ = decode_rate(model, b, 32, new_tokens, g, vocab_hi=32000)
        dm, _ = decode_rate(dense_merged, b, 32, new_tokens, g, vocab_hi=32000)
        r = {lay: decode_rate(m, b, 32, new_tokens, g, vocab_hi=32000)[0] for lay, (m, _) in packed.items()}
        name = f"{'smoke (tiny dims)' if smoke else dims + '-dims'}, {cfg.num_hidden_layers} blocks (random bf16, Wanda 2:4)"
        emit(rows, {"model": name, "sparsity": "2:4", "batch": b, "dense_tok_s": d, "sparse_tok_s": r["nm24"],
                    "speedup": r["nm24"] / d, "layout": "nm24", "merged": True, "delta_tok_s": r["delta"],
                    "delta_speedup": r["delta"] / d, "dense_merged_tok_s": dm,
                    "speedup_vs_dense_merged": r["nm24"] / dm}, on_row)
    pre = []
    for t in prefill or []:
        d = prefill_ms(model, t, vocab_hi=32000)
        r = {lay: prefill_ms(m, t, vocab_hi=32000) for lay, (m, _) in packed.items()}
        old = linear.CSLT_TOKENS
        linear.CSLT_TOKENS = 1 << 30  # the nm24 model with cuSPARSELt off
        try:
            unpacked = prefill_ms(packed["nm24"][0], t, vocab_hi=32000)
        finally:
            linear.CSLT_TOKENS = old
        pre.append({"tokens": t, "dense_ms": d, "nm24_ms": r["nm24"], "nm24_speedup": d / r["nm24"],
                    "nm24_unpacked_ms": unpacked, "nm24_unpacked_speedup": d / unpacked,
                    "delta_ms": r["delta"], "delta_speedup": d / r["delta"]})
        print(json.dumps(pre[-1]), flush=True)
    info = {"prefill": pre, "logit_max_abs_diff": diffs, "logit_max_abs": scale, "dense_weight_bytes": weight_bytes(model),
            **{f"{lay}_weight_bytes": weight_bytes(m) for lay, (m, _) in packed.items()},
            **{f"{lay}_sparse_layers": n for lay, (_, n) in packed.items()},
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if DEV.type == "cuda" else None}
    return rows, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="linears,breakeven,e2e")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--batches", default="1,2,4,16,64,2048")
    ap.add_argument("--sparsities", default="0.5,0.6,0.7,0.8,2:4")
    ap.add_argument("--breakeven-sparsities", default="0.5,0.55,0.6,0.65,0.7,0.75")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--smoke", action="store_true", help="tiny dimensions on the CPU (checks the code path)")
    ap.add_argument("--e2e-dims", default="llama2-7b", choices=tuple(E2E_DIMS))
    ap.add_argument("--e2e-blocks", type=int, default=0, help="end to end with this many blocks (0: all)")
    ap.add_argument("--e2e-compile", action="store_true", help="end to end with each decode step torch.compile'd")
    ap.add_argument("--e2e-batches", default="1,4,16", help="end to end: decode batch sizes")
    ap.add_argument("--e2e-prefill", default="", help="end to end: also time one sequence's prefill of these lengths")
    a = ap.parse_args()
    global DEV
    if a.smoke:
        DEV = torch.device("cpu")
    parts = a.parts.split(",")
    res: dict = {"device": torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu", "torch": torch.__version__, "dtype": "bfloat16"}
    try:
        import transformers
        import triton

        res.update(triton=triton.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    out = Path(a.out)

    def save() -> None:
        out.write_text(json.dumps(res, indent=1))

    sps = [s if s == "2:4" else float(s) for s in a.sparsities.split(",")]
    if "linears" in parts:
        res["linears"] = linears(a.reps, [int(b) for b in a.batches.split(",")], sps,
                                 lambda rows: (res.update(linears=rows), save()))
        save()
    if "merged" in parts:
        res["merged_linears"] = merged_linears(a.reps, [int(b) for b in a.batches.split(",")], 0.7,
                                               lambda rows: (res.update(merged_linears=rows), save()))
        save()
    if "breakeven" in parts:
        res["breakeven"] = breakeven(a.reps, tuple(float(v) for v in a.breakeven_sparsities.split(",")))
        save()
    if "e2e" in parts:
        def partial(rows: list[dict]) -> None:
            res["end_to_end"] = rows
            save()

        res["end_to_end"], res["end_to_end_info"] = e2e([int(b) for b in a.e2e_batches.split(",")], a.new_tokens,
                                                        a.nsamples, a.seqlen, a.smoke, a.e2e_dims, a.e2e_blocks,
                                                        a.e2e_compile, partial,
                                                        [int(t) for t in a.e2e_prefill.split(",") if t.strip()])
        save()
    if "e2e24" in parts:
        res["end_to_end_24"], res["end_to_end_24_info"] = e2e_24(
            [int(b) for b in a.e2e_batches.split(",")], a.new_tokens, a.nsamples, a.seqlen, a.smoke, a.e2e_dims,
            lambda rows: (res.update(end_to_end_24=rows), save()),
            [int(t) for t in a.e2e_prefill.split(",") if t.strip()], a.e2e_blocks)
        save()


if __name__ == "__main__":
    main()
