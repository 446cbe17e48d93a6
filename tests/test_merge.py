"""Stacking the linears that read one input (layerprune/sparse/merge.py): found by a trace, exact, any call order."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import ARCHS, tiny_model
from layerprune.sparse import delta
from layerprune.sparse.export import sparsify
from layerprune.sparse.linear import SparseLinear
from layerprune.sparse.merge import MergedPart, cat_delta, merge_siblings, sibling_groups


def _masked(arch: str, sparsity: float = 0.7, seed: int = 1) -> torch.nn.Module:
    m = tiny_model(arch, layers=2, seed=seed)
    with torch.no_grad():
        for i, lin in enumerate(x for x in m.modules() if isinstance(x, torch.nn.Linear) and x is not m.lm_head):
            g = torch.Generator().manual_seed(i)
            lin.weight.masked_fill_(torch.rand(lin.weight.shape, generator=g) < sparsity, 0)
    return m


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["delta", "bitmask", "dense"])
def test_merge_finds_the_siblings_and_keeps_the_logits(arch, kind):
    """q/k/v and gate/up (OPT: q/k/v only; its fc1 reads the norm alone) are found by the trace in every block;
    merged, the model's logits are bit for bit those of the unmerged model (the plain-PyTorch path here)."""
    m = _masked(arch)
    if kind != "dense":
        sparsify(m, min_sparsity=0.5, layout=kind)
    x = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        ref = m(x).logits
        groups = merge_siblings(m)
        out = m(x).logits
    per_block = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]]
    if arch != "opt":
        per_block.append(["mlp.gate_proj", "mlp.up_proj"])
    blocks = "model.decoder.layers" if arch == "opt" else "model.layers"
    assert groups == [[f"{blocks}.{i}.{n}" for n in g] for i in range(2) for g in per_block]
    assert torch.equal(out, ref)
    parts = [x for x in m.modules() if isinstance(x, MergedPart)]
    assert len(parts) == sum(len(g) for g in groups)
    kinds = {type(p.group.linear) for p in parts}
    assert kinds == ({torch.nn.Linear} if kind == "dense" else {SparseLinear})
    assert merge_siblings(m) == []  # a merged model has nothing left to merge


@pytest.mark.parametrize("kind", ["0.7", "uneven", "empty", "2:4", "0.97"])
def test_cat_delta_is_the_pack_of_the_stacked_weight(kind):
    """Concatenating packed row blocks gives the very buffers ``pack`` makes of the stacked weight."""
    from test_sparse import _weight

    ws = [_weight(n, 200, kind, seed=n) for n in (16, 5, 37)]
    got, want = cat_delta([delta.pack(w) for w in ws]), delta.pack(torch.cat(ws))
    delta.validate(got)
    assert got.shape == want.shape
    for a, b in zip(got.buffers(), want.buffers()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="input widths"):
        cat_delta([delta.pack(ws[0]), delta.pack(ws[0][:, :100])])


def test_a_group_mixing_packed_and_dense_linears_stays_apart():
    """A linear under its break-even stays ``nn.Linear``; its group (q/k/v) is not merged, the others are."""
    m = _masked("llama")
    with torch.no_grad():
        for blk in m.model.layers:
            blk.self_attn.v_proj.weight.normal_()  # dense: under any threshold
    sparsify(m, min_sparsity=0.5)
    assert isinstance(m.model.layers[0].self_attn.v_proj, torch.nn.Linear)
    groups = merge_siblings(m)
    assert groups == [[f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"] for i in range(2)]
    assert isinstance(m.model.layers[0].self_attn.q_proj, SparseLinear)


def test_parts_called_in_any_order_or_with_other_inputs():
    """Each part returns its own linear's output whatever the order of the calls and whether its siblings saw
    the same tensor; the stacked output is not kept after the last part."""
    m = _masked("llama")
    sparsify(m, min_sparsity=0.5)
    attn = m.model.layers[0].self_attn
    lins = [copy.deepcopy(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")]
    merge_siblings(m)
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    x, x2 = torch.randn(3, 64), torch.randn(3, 64)
    with torch.no_grad():
        for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
            for i in order:
                assert torch.equal(parts[i](x), lins[i](x))
        assert torch.equal(parts[0](x), lins[0](x)) and torch.equal(parts[1](x2), lins[1](x2))
        assert torch.equal(parts[2](x), lins[2](x))
    assert parts[0].group._y is None and parts[0].group._x is None


def test_sibling_groups_leave_the_model_unchanged():
    m = _masked("qwen2")
    before = {n: type(x) for n, x in m.named_modules()}
    assert len(sibling_groups(m)) == 4
    assert {n: type(x) for n, x in m.named_modules()} == before
    assert all(not x._forward_pre_hooks for x in m.modules())


def test_merged_decode_step_compiles_whole():
    """The merged sparse model's decode step (StaticCache, the sparse op, the parts' shared product) compiles
    with fullgraph=True and decodes the greedy tokens of the eager step."""
    from layerprune.sparse.bench import decode_rate, prefilled

    m = _masked("llama")
    m.config.use_cache = True
    sparsify(m, min_sparsity=0.5)
    assert merge_siblings(m)
    torch._dynamo.reset()
    rate, mode = decode_rate(m, 1, 8, 3, graphs=False, vocab_hi=100, compile="aot_eager")
    assert rate > 0 and mode == "compiled+eager"
    with torch.no_grad():
        cache, tok, pos = prefilled(m, 1, 8, 16, 100)
        step = torch.compile(lambda t, p: m(input_ids=t, past_key_values=cache, cache_position=p, use_cache=True).logits,
                             backend="aot_eager", fullgraph=True)
        got = step(tok, pos)
        cache, tok, pos = prefilled(m, 1, 8, 16, 100)
        want = m(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the CUDA kernels and CUDA-graph capture need a CUDA GPU (none here; run on the H200)")
def test_cuda_merged_model_in_a_cuda_graph_equals_the_unmerged_model():
    """On the GPU (bf16, the CUDA kernels): a decode step captured in a CUDA graph and replayed gives the same
    logits for the merged sparse model as for the unmerged one (within bf16 rounding: the stacked shape may take
    another kernel setting), and so does the eager step. Each model gets the same prefill, warm-up and capture
    (a step run twice is not idempotent: the static cache counts what it has seen)."""
    from transformers import StaticCache

    m = _masked("llama").to("cuda", torch.bfloat16)
    m.config.use_cache = True
    sparsify(m, min_sparsity=0.5)
    mm = copy.deepcopy(m)
    assert merge_siblings(mm)
    ids = torch.randint(10, 100, (2, 8), generator=torch.Generator().manual_seed(0)).cuda()
    tok = torch.randint(10, 100, (2, 1), generator=torch.Generator().manual_seed(1)).cuda()
    pos = torch.tensor([8], device="cuda")

    def step(model):
        cache = StaticCache(config=model.config, max_batch_size=2, max_cache_len=16)
        model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(8, device="cuda"), use_cache=True)
        return lambda: model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits

    def replayed(model):
        run = step(model)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = run()
        g.replay()
        torch.cuda.synchronize()
        return out.float()

    with torch.no_grad():
        pairs = [(step(mm)().float(), step(m)().float()), (replayed(mm), replayed(m))]
    for got, want in pairs:
        assert float((got - want).abs().max()) <= 0.02 * float(want.abs().max())
