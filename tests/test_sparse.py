"""The compressed sparse format, SparseLinear, its Triton kernels (under TRITON_INTERPRET=1) and export/load."""

from __future__ import annotations

import json
import os

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


@pytest.mark.parametrize("kind", ["0.7", "uneven", "2:4"])
def test_triton_decompress_is_exact(interpret, kind):
    from layerprune.sparse import kernels

    w = _weight(37, 200, kind)
    sp = pack(w)
    assert torch.equal(kernels.decompress(sp.bitmask, sp.values, sp.offsets, 37, 200, sp.bn, sp.bk), w)


def test_custom_op_paths_and_compile(interpret):
    """The op runs the decode kernel for small batches and decompress + F.linear for large ones; it has a
    fake implementation, so torch.compile traces through it."""
    from layerprune.sparse.linear import SparseLinear

    lin = torch.nn.Linear(130, 50, bias=False)
    lin.weight.data = _weight(50, 130, "uneven")
    sl = SparseLinear.from_linear(lin)
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


def test_export_load_same_logits_and_greedy_tokens(tiny_with_tok, tmp_path, capsys):
    from layerprune.cli import main
    from layerprune.models.loading import load_model
    from layerprune.sparse import load_sparse
    from layerprune.sparse.linear import SparseLinear

    model, tok = tiny_with_tok
    pdir, _ = _pruned_dir(tmp_path, model, tok)
    assert main(["export", str(pdir), "--format", "sparse", "--min-sparsity", "0.5", "--out", str(tmp_path / "sp"),
                 "--json", "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sparse_layers"] == len(info["layers"]) and info["size"]["ratio"] < 0.75
    sm = load_sparse(tmp_path / "sp")
    assert sum(isinstance(m, SparseLinear) for m in sm.modules()) == info["sparse_layers"]
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
    assert main(["generate", str(tmp_path / "sp"), "--max-new-tokens", "3", "--device", "cpu", "--json",
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["sparse_layers"] == info["sparse_layers"]


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
    key = next(k for k in sd if k.endswith(".offsets"))
    sd[key][2] += 3
    save_file(sd, str(f))
    with pytest.raises(UserError, match="offsets disagree"):
        load_sparse(tmp_path / "sp")
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(UserError, match="damaged"):
        load_sparse(tmp_path / "sp")


@pytest.mark.slow
def test_smollm2_sparse_generates_the_same_greedy_tokens(tmp_path, smol):
    """The real pruned SmolLM2 (Wanda 50%, DLP) saved sparse loads back and generates what the dense-with-
    zeros model generates."""
    import copy

    from layerprune.sparse.export import densify, sparsify

    model, tok = smol
    m = copy.deepcopy(model)
    from layerprune.api import prune

    prune(m, tokenizer=tok, sparsity=0.5, pruner="wanda", allocation="dlp", eval=[], nsamples=4, seqlen=128,
          device="cpu", progress=False, use_cache=False)
    sp = copy.deepcopy(m)
    sparsify(sp)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                       pad_token_id=tok.eos_token_id)
        b = sp.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                        pad_token_id=tok.eos_token_id)
    assert torch.equal(a, b)
    assert torch.equal(densify(sp).model.layers[3].mlp.up_proj.weight, m.model.layers[3].mlp.up_proj.weight)
