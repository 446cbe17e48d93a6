"""The nm24 layout (2:4 weights in the sparse tensor cores' fragment order): packing, validation, the op's paths,
export and load; its CUDA kernels on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from layerprune.errors import UserError
from layerprune.pruners.masks import nm_mask
from layerprune.sparse import nm24


def _w24(n: int, k: int, dtype=torch.bfloat16, seed: int = 0, device="cpu") -> torch.Tensor:
    """A 2:4 weight with every kind of group: two nonzeros (most), one, none, and -0.0 where a zero is."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    w = w.masked_fill(nm_mask(w.abs().float(), 2, 4), 0)
    w[0, :4] = 0  # an empty group
    w[1, :4] = torch.tensor([0.0, 0.0, 0.0, 1.5]).to(dtype)  # one nonzero, last position
    w[2, 4:8] = torch.tensor([-0.0, 2.0, 0.0, 0.0]).to(dtype)
    if n > 3:
        w[3] = 0  # an empty row
    return w.to(device)


@pytest.mark.parametrize("shape", [(16, 32), (48, 96), (64, 160), (32, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nm24_pack_unpack_exact_and_bytes(shape, dtype):
    w = _w24(*shape, dtype=dtype)
    sp = nm24.pack(w)
    assert torch.equal(nm24.unpack(sp), w)
    n, k = shape
    assert sp.values.shape == (n // 16 * (k // 32), 32, 8) and sp.meta.shape == (n // 16 * (k // 32), 16)
    assert sp.nbytes() == n * k // 2 * w.element_size() + n * k // 8  # 1.125 bytes a weight in bf16
    nm24.validate(sp)
    p = nm24.positions(sp.meta, n, k).view(n, k // 4, 2)
    assert bool((p[..., 0] < p[..., 1]).all())  # two ascending positions a group, as the instruction reads them


def test_nm24_fragment_order_is_the_instructions():
    """The documented order (what the GPU test checks against F.linear): lane 4g + t holds row g's kept columns
    2t, 2t + 1, then row g + 8's, then the same for kept columns 2t + 8, 2t + 9; metadata word 2g + h holds the
    positions of rows g (low half) and g + 8 (high half), kept columns 8h … 8h + 7, two bits each from bit 0. With
    every group keeping positions 0 and 2 each half is 0x8888, as in PTX's example."""
    n, k = 16, 32
    w = torch.zeros(n, k, dtype=torch.bfloat16)
    w[:, 0::4] = torch.arange(n * k // 4, dtype=torch.float32).view(n, k // 4).to(torch.bfloat16) + 1
    w[:, 2::4] = -w[:, 0::4]
    sp = nm24.pack(w)
    assert bool((sp.meta.view(torch.int32) == int(0x88888888 - 2**32)).all())
    kept = torch.stack([w[:, 0::4], w[:, 2::4]], -1).reshape(n, 16)  # kept column 2j + s of group j
    for lane in (0, 5, 31):
        g, t = lane // 4, lane % 4
        want = torch.cat([kept[g, 2 * t:2 * t + 2], kept[g + 8, 2 * t:2 * t + 2], kept[g, 2 * t + 8:2 * t + 10],
                          kept[g + 8, 2 * t + 8:2 * t + 10]])
        assert torch.equal(sp.values[0, lane], want)


def test_nm24_refuses_what_it_cannot_hold():
    w = _w24(32, 64)
    w[5, 8:12] = 1.0  # three nonzeros in one group
    assert not nm24.fits(w)
    with pytest.raises(ValueError, match="2:4"):
        nm24.pack(w)
    assert not nm24.fits(_w24(16, 48)[:, :40]) and not nm24.fits(_w24(32, 64)[:24])
    sp = nm24.pack(_w24(32, 64))
    bad = nm24.NM24Tensor(sp.values, sp.meta.clone(), sp.shape)
    bad.meta[1] ^= 0b1011  # first group of a row: positions (0, 2) → (3, 1): out of order
    with pytest.raises(UserError, match="out of order"):
        nm24.validate(bad)
    with pytest.raises(UserError, match="wrong sizes"):
        nm24.validate(nm24.NM24Tensor(sp.values[:-1], sp.meta, sp.shape))


@pytest.mark.parametrize("batch", [1, 5, 70])
def test_sparse_linear_nm24_torch_path_equals_f_linear(batch):
    from layerprune.sparse.linear import SparseLinear

    lin = torch.nn.Linear(96, 48, bias=True)
    lin.weight.data = _w24(48, 96, dtype=torch.float32)
    sl = SparseLinear.from_linear(lin, "nm24")
    assert sl.layout == "nm24" and "sparsity=0.5" in repr(sl)
    x = torch.randn(batch, 96)
    assert torch.allclose(sl(x), lin(x), atol=1e-5)
    assert torch.equal(sl.dense_weight(), lin.weight.data)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:  # torch.compile traces through the op
        out = torch.ops.layerprune.sparse_linear_nm24(mode.from_tensor(x), mode.from_tensor(sl.values),
                                                      mode.from_tensor(sl.meta), 48, 96)
        assert out.shape == (batch, 48)


def test_export_nm24_packs_the_2_4_linears_and_loads_back(tiny_with_tok, tmp_path, capsys):
    """A 2:4-pruned model exported with --layout nm24: every linear in nm24 (one made not 2:4 falls back to delta,
    named in its entry), the same logits and greedy tokens as the dense-with-zeros model, and a corrupted
    metadata word refused on load."""
    from safetensors.torch import load_file, save_file

    from layerprune.api import prune
    from layerprune.cli import main
    from layerprune.models.loading import load_model
    from layerprune.sparse import load_sparse
    from layerprune.sparse.linear import SparseLinear

    model, tok = tiny_with_tok
    prune(model, tokenizer=tok, sparsity=0.5, pattern="2:4", pruner="wanda", allocation="uniform", eval=[],
          nsamples=2, seqlen=32, device="cpu", out=tmp_path / "pruned", progress=False)
    shard = next((tmp_path / "pruned").glob("*.safetensors"))
    sd = load_file(str(shard))
    key = next(k for k in sd if k.endswith("layers.1.mlp.down_proj.weight"))
    sd[key][0, :8] = 0.5  # this linear is no longer 2:4 (still sparse enough for the delta layout)
    save_file(sd, str(shard), metadata={"format": "pt"})
    assert main(["export", str(tmp_path / "pruned"), "--layout", "nm24", "--min-sparsity", "0.45", "--out",
                 str(tmp_path / "sp"), "--json", "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out)
    lays = {name: v.get("layout") for name, v in info["layers"].items()}
    assert lays.pop("model.layers.1.mlp.down_proj") == "delta" and set(lays.values()) == {"nm24"}
    assert info["sparse_layers"] == len(info["layers"]) and info["bytes_per_weight_2:4"] == 4 / 2 + 0.125  # fp32 values
    from layerprune.cli.commands import _other_layouts

    assert _other_layouts(info) == ", 1 linear in delta"  # the summary line of the export's table
    sm = load_sparse(tmp_path / "sp")
    assert {m.layout for m in sm.modules() if isinstance(m, SparseLinear)} == {"nm24", "delta"}
    dense, _ = load_model(str(tmp_path / "pruned"))
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        assert torch.allclose(sm(ids).logits, dense(ids).logits, atol=1e-4)
        smm = load_sparse(tmp_path / "sp", merge=True)  # q/k/v and gate/up stacked: the same logits
        assert torch.equal(smm(ids).logits, sm(ids).logits)
        g1 = sm.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=5, do_sample=False,
                         pad_token_id=0)
        g2 = dense.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=5, do_sample=False,
                            pad_token_id=0)
    assert torch.equal(g1, g2)
    f = tmp_path / "sp" / "model.safetensors"
    sd = load_file(str(f))
    key = next(k for k in sd if k.endswith(".meta"))
    sd[key][0, 0] ^= 0b1011  # (0, 2) → (3, 1) in the first group
    save_file(sd, str(f))
    cfg_path = tmp_path / "sp" / "sparse_config.json"
    cfg = json.loads(cfg_path.read_text())
    for v in cfg["layers"].values():
        v.pop("crc32", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="out of order"):
        load_sparse(tmp_path / "sp")


def test_nm24_source_compiles():
    """The CUDA source compiles for sm_80 and sm_90 where nvcc is installed (the GPU tests below run it)."""
    from test_sparse import _nvcc_compiles

    from layerprune.sparse import nm24_cuda

    srcs = [(nm24_cuda.source(mt, mw, 8, 4, ch, minb), sm)
            for mt, mw, ch, minb, sm in ((8, 1, 0, 1, 80), (64, 1, 256, 1, 90), (32, 2, 0, 1, 90), (16, 1, 512, 4, 90))]
    _nvcc_compiles(srcs)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the nm24 kernels need a CUDA device (the GPU machine)")


@CUDA
@pytest.mark.parametrize("shape", [(48, 96), (2064, 4096), (14336, 544), (128, 28672)])
@pytest.mark.parametrize("batch", [1, 3, 8, 16, 33, 64, 70, 300])
def test_cuda_nm24_kernel_equals_f_linear(shape, batch):
    """The op on the GPU (the sparse tensor-core kernel up to 64 tokens, several passes or unpack + cuBLAS past
    that) against F.linear on the dense weight: within bf16 rounding of the largest output."""
    from layerprune.sparse import nm24_cuda
    from layerprune.sparse.linear import SparseLinear

    n, k = shape
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    lin.weight.data = _w24(n, k, device="cuda")
    sl = SparseLinear.from_linear(lin, "nm24")
    x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x.float(), lin.weight.float())
    ys = [sl(x)] + [nm24_cuda.spmm(x, sl.values, sl.meta, n, k, v)  # x staged whole, or in chunks of 128-512 columns
                    for v in (None, (1, 8, 4, 256), (2, 8, 4, 512), (2, 4, 2, 128), (1, 8, 4, 512, 4), (1, 4, 4, 256, 8))]
    for y in ys:
        assert (y.float() - ref).abs().max() <= 0.01 * ref.abs().max() + 1e-3
    xs = torch.randn(batch, k + 8, device="cuda", dtype=torch.bfloat16)[:, 3:3 + k]  # unaligned, strided rows
    for v in (None, (1, 8, 4, 512, 4)):
        ys = nm24_cuda.spmm(xs, sl.values, sl.meta, n, k, v)
        assert (ys.float() - F.linear(xs.float(), lin.weight.float())).abs().max() <= 0.01 * ref.abs().max() + 1e-2


@CUDA
@pytest.mark.parametrize("shape", [(48, 96), (2064, 4096), (128, 28672)])
def test_cuda_nm24_unpack_is_exact(shape):
    from layerprune.sparse import nm24_cuda

    w = _w24(*shape, device="cuda")
    sp = nm24.pack(w)
    assert torch.equal(nm24_cuda.unpack(sp.values, sp.meta, *shape), w)


@CUDA
def test_cuda_nm24_replays_in_a_cuda_graph():
    from layerprune.sparse.linear import SparseLinear

    lin = torch.nn.Linear(4096, 2048, bias=False, device="cuda", dtype=torch.bfloat16)
    lin.weight.data = _w24(2048, 4096, device="cuda")
    sl = SparseLinear.from_linear(lin, "nm24")
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    want = sl(x)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = sl(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    assert torch.equal(y, sl(x)) and not torch.equal(y, want)


def test_nm24_settings_launch_within_the_limits():
    """Every shape × token count the op sends to the kernel gets settings it can launch with on a 132-SM device with
    227 KB of shared memory a block: x chunks a multiple of the tiles in flight, at most 1024 threads, x within the
    shared memory, registers asked for no more blocks than fit."""
    from layerprune.sparse import nm24_cuda
    from layerprune.sparse.linear import NM24_TOKENS, nm24_kernel_wanted

    shapes = [(1024, 4096), (4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336), (8192, 8192),
              (28672, 8192), (8192, 28672), (2064, 544), (48, 96)]
    for n, k in shapes:
        for b in range(1, NM24_TOKENS + 1):
            if not nm24_kernel_wanted(b, n, k):
                continue
            mw, wb, uu, ch, minb = nm24_cuda.settings(n, k, b)
            mt = next(t for t in nm24_cuda.MMA_TOKENS if t >= b)
            assert ch % (32 * uu) == 0 and 32 * wb <= 1024 and 1 <= minb <= 2048 // (32 * wb)
            tiles = -(-n // (16 * mw * wb))
            kc = nm24_cuda.split_columns(k, tiles, 132, mt, ch)
            assert kc % 64 == 0 and 2 * mt * ((ch or kc) + 8) <= 227 * 1024, (n, k, b)


def test_cslt_pack_reproduces_cusparselt_compressions():
    """bench/probe_24prefill.cslt_pack (cuSPARSELt's 2:4 layout written out) against compressions that
    ``torch._cslt_compress`` made on the H200 (bench/results/cslt_layout_session28): byte for byte; and the probe's
    nm24 → cuSPARSELt CUDA kernel's index arithmetic, emulated, against cslt_pack."""
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    try:
        from probe_24prefill import read
    finally:
        sys.path.remove(str(root / "bench"))
    outcomes = read(root / "bench" / "results" / "cslt_layout_session28")
    assert len(outcomes) == 24 and all(outcomes)


def _probe():
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    try:
        import probe_24prefill
    finally:
        sys.path.remove(str(root / "bench"))
    return probe_24prefill


@pytest.mark.parametrize("shape", [(64, 96), (128, 352), (192, 1056)])
def test_cslt_layout_where_a_row_band_is_not_a_power_of_two(shape):
    """cuSPARSELt's metadata offset (``cslt.nibble``) maps the n·k/4 groups one to one onto the nibbles, also where
    k/4 is not a power of two (11008 and 28672 columns: session 29 found the probe's version OR-ing the row band's
    offset in, which is right only for powers of two); the conversion kernel's index arithmetic, emulated, equals
    ``cslt_pack`` there."""
    from layerprune.sparse.cslt import nibble

    n, k = shape
    where = nibble(torch.arange(n)[:, None], torch.arange(k // 4)[None, :], k // 4).reshape(-1)
    assert torch.equal(where.sort().values, torch.arange(n * k // 4))
    probe = _probe()
    w = _w24(n, k)
    assert torch.equal(probe.emulate_convert(nm24.pack(w), n, k), probe.cslt_pack(w))


def test_cslt_declines_off_the_gpu_and_off_its_shapes():
    import os
    import subprocess
    import sys

    from layerprune.sparse import cslt
    from layerprune.sparse.linear import nm24_cslt_wanted

    off = subprocess.run([sys.executable, "-c", "from layerprune.sparse import cslt; print(cslt.ENABLED)"],
                         env={**os.environ, "LAYERPRUNE_CUSPARSELT": "0"}, capture_output=True, text=True)
    assert off.stdout.strip() == "False" and cslt.ENABLED  # the switch, read at import

    w = _w24(64, 64)
    sp = nm24.pack(w)
    assert cslt.mm(torch.randn(200, 64, dtype=torch.bfloat16), sp.values, sp.meta, 64, 64) is None
    assert not cslt.fits(48, 128) and not cslt.fits(64, 96) and cslt.fits(64, 128) and cslt.fits(4096, 11008)
    assert not nm24_cslt_wanted(4096, 11008 - 16, 8192) and not nm24_cslt_wanted(8, 8192, 8192)
    assert nm24_cslt_wanted(1024, 4096, 4096) and not nm24_cslt_wanted(512, 4096, 4096)
    assert not nm24_cslt_wanted(512, 28672, 8192) and not nm24_cslt_wanted(2048, 1024, 4096)


def test_cslt_layout_check_turns_the_path_off_unless_the_bytes_match(monkeypatch):
    """``cslt.layout_ok`` (run once a device before the first cuSPARSELt product): true when the conversion's bytes
    equal ``torch._cslt_compress``'s, false when one byte differs or cuSPARSELt is missing (here both faked on the
    CPU with the probe's ``cslt_pack``)."""
    from layerprune.sparse import cslt

    probe = _probe()
    monkeypatch.setattr(cslt, "convert", lambda v, m, n, k: probe.cslt_pack(nm24.unpack(nm24.NM24Tensor(v, m, (n, k)))))
    monkeypatch.setattr(torch, "_cslt_compress", lambda w: probe.cslt_pack(w).view(torch.bfloat16), raising=False)
    assert cslt.layout_ok(torch.device("cpu"))

    def off_by_one(w):
        b = probe.cslt_pack(w)
        b[-1] ^= 1
        return b.view(torch.bfloat16)

    monkeypatch.setattr(torch, "_cslt_compress", off_by_one)
    assert not cslt.layout_ok(torch.device("cpu"))

    def missing(w):
        raise RuntimeError("cuSPARSELt not supported on your machine.")

    monkeypatch.setattr(torch, "_cslt_compress", missing)
    assert not cslt.layout_ok(torch.device("cpu"))


@CUDA
def test_cuda_cslt_layout_check_passes_here():
    from layerprune.sparse import cslt

    assert cslt.layout_ok(torch.device("cuda"))


@CUDA
@pytest.mark.parametrize("shape", [(64, 128), (192, 1152), (4096, 4096)])
def test_cuda_cslt_conversion_equals_cusparselt_compress(shape):
    from layerprune.sparse import cslt

    n, k = shape
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)).bfloat16()  # two nonzeros in every group (where
    w = w.masked_fill(nm_mask(w.abs().float(), 2, 4), 0).cuda()  # one or none, cuSPARSELt keeps other zeros than nm24)
    sp = nm24.pack(w)
    got = cslt.convert(sp.values, sp.meta, n, k)
    assert torch.equal(got, torch._cslt_compress(w).view(torch.uint8).reshape(-1))
    assert torch.equal(got, _probe().cslt_pack(w))


@CUDA
@pytest.mark.parametrize("shape", [(64, 128), (192, 1152), (4096, 4096)])
@pytest.mark.parametrize("batch", [1, 100, 128, 300])
def test_cuda_cslt_mm_equals_f_linear(shape, batch):
    """cuSPARSELt through layerprune's own plans (the first call makes the plan and searches it, the second reuses
    it; x with strided rows) and the op routed to it, against F.linear on the dense weight; a replay from a CUDA
    graph follows x."""
    from layerprune.sparse import cslt, linear

    n, k = shape
    w = _w24(n, k, device="cuda")
    sp = nm24.pack(w)
    xs = torch.randn(batch, k + 8, device="cuda", dtype=torch.bfloat16)[:, 8:]
    ref = F.linear(xs.float(), w.float())
    tol = 0.01 * ref.abs().max() + 1e-3
    for _ in range(2):
        y = cslt.mm(xs, sp.values, sp.meta, n, k)
        assert y is not None and y.shape == (batch, n) and (y.float() - ref).abs().max() <= tol
    old = linear.CSLT_TOKENS, linear.CSLT_WEIGHTS
    linear.CSLT_TOKENS = linear.CSLT_WEIGHTS = 0
    try:
        if batch > linear.NM24_TOKENS:
            assert linear.nm24_cslt_wanted(batch, n, k)
        y = linear.sparse_linear_nm24(xs, sp.values, sp.meta, n, k)
        assert (y.float() - ref).abs().max() <= tol
    finally:
        linear.CSLT_TOKENS, linear.CSLT_WEIGHTS = old
    x = xs.contiguous()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = cslt.mm(x, sp.values, sp.meta, n, k)
    x.copy_(torch.randn_like(x))
    g.replay()
    assert (yg.float() - F.linear(x.float(), w.float())).abs().max() <= 0.01 * ref.abs().max() + 1e-2


def test_kernel_launch_takes_tensors_and_device_addresses(monkeypatch):
    """``delta_cuda._launch`` (every CUDA kernel's launch; the cuSPARSELt conversion passes addresses inside one
    buffer as ints): cuLaunchKernel receives no per-argument array but ``extra`` = (BUFFER_POINTER, buffer,
    BUFFER_SIZE, &size, END), the buffer holding each pointer (8 bytes), then each int (4 bytes), in order."""
    import ctypes
    import struct
    from types import SimpleNamespace

    from layerprune.sparse import delta_cuda

    seen = {}

    def fake(func, gx, gy, gz, bx, by, bz, smem, stream, argv, extra):
        slots = ctypes.cast(extra, ctypes.POINTER(ctypes.c_void_p))
        assert argv is None and slots[0] == 1 and slots[2] == 2 and slots[4] is None
        size = ctypes.cast(slots[3], ctypes.POINTER(ctypes.c_size_t))[0]
        raw = ctypes.string_at(slots[1], size)
        assert size == 2 * 8 + 2 * 4
        seen["ptrs"] = list(struct.unpack("=2Q", raw[:16]))
        seen["ints"] = list(struct.unpack("=2i", raw[16:]))
        seen["grid"] = (gx, gy, gz, bx, stream)
        return 0

    monkeypatch.setattr(delta_cuda, "_launcher", lambda: fake)
    t = torch.zeros(4)
    delta_cuda._launch(SimpleNamespace(func=None), (3, 1), 256, 0, 7, (t, t.data_ptr() + 8), (5, -2))
    assert seen == {"ptrs": [t.data_ptr(), t.data_ptr() + 8], "ints": [5, -2], "grid": (3, 1, 1, 256, 7)}
