import pytest
import torch

from conftest import tiny_model
from layerprune.engine.sequential import prune_sequential
from layerprune.models.adapter import ModelAdapter
from layerprune.pruners import PRUNERS, Pattern


def reference_loop(model, ids, sparsity, method):
    """A plain per-sample loop in the style of the reference repos (one sequence per forward,
    the block run twice), written independently of the engine, using the model's own forward."""
    ad = ModelAdapter.of(model)
    # inputs of block 0 and per-block kwargs, one sample at a time, via the model's hidden states
    L = ad.n_blocks
    masks = {}
    for i in range(L):
        lins = ad.linears(i)
        prs = {n: PRUNERS[method].make(lin) for n, lin in lins.items()}
        hooks = [lin.register_forward_hook(lambda m, inp, out, p=prs[n]: p.add_batch(inp[0])) for n, lin in lins.items()]
        # block i's inputs come from the already-pruned blocks 0..i-1: just run the whole model per sample
        # with only blocks 0..i active (later blocks see data but have no hooks)
        with torch.no_grad():
            for s in range(ids.shape[0]):
                model(input_ids=ids[s : s + 1])
        for h in hooks:
            h.remove()
        for n, lin in lins.items():
            masks[ad.full_name(i, n)] = prs[n].prune(Pattern(sparsity)).clone()
    return masks


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_engine_matches_per_sample_reference(method):
    ids = torch.randint(0, 128, (6, 32))
    m_ref = tiny_model("llama", layers=3, seed=3)
    m_eng = tiny_model("llama", layers=3, seed=3)
    ref_masks = reference_loop(m_ref, ids, 0.5, method)
    ad = ModelAdapter.of(m_eng)
    plan = {ad.full_name(i, n): Pattern(0.5) for i in range(3) for n in ad.linear_names[i]}
    prune_sequential(m_eng, ad, ids, plan, method, torch.device("cpu"), batch_size=4, progress=False)
    for (i, n, lin) in ad.all_linears():
        name = ad.full_name(i, n)
        eng_mask = lin.weight.data == 0
        agree = (eng_mask == ref_masks[name]).float().mean().item()
        assert agree > 0.995, f"{name}: masks agree on {agree:.4f}"
    sd_ref, sd_eng = m_ref.state_dict(), m_eng.state_dict()
    for k in sd_ref:
        assert torch.allclose(sd_ref[k], sd_eng[k], atol=1e-4, rtol=1e-3), k


def test_per_linear_sparsity_and_magnitude_without_data():
    m = tiny_model("qwen2")
    ad = ModelAdapter.of(m)
    plan = {}
    for i, n, lin in ad.all_linears():
        plan[ad.full_name(i, n)] = Pattern(0.1 * (i + 1))
    res = prune_sequential(m, ad, None, plan, "magnitude", torch.device("cpu"), progress=False)
    for name, rec in res.per_linear.items():
        assert rec["zeros"] == int(rec["numel"] * plan[name].sparsity)


def test_batch_size_does_not_change_result():
    ids = torch.randint(0, 128, (6, 32))
    outs = []
    for bs in (1, 6):
        m = tiny_model("gemma3", seed=5)
        ad = ModelAdapter.of(m)
        plan = {ad.full_name(i, n): Pattern(0.6) for i in range(3) for n in ad.linear_names[i]}
        prune_sequential(m, ad, ids, plan, "wanda", torch.device("cpu"), batch_size=bs, progress=False)
        outs.append(torch.cat([p.flatten() for p in m.parameters()]))
    assert (outs[0] == 0).eq(outs[1] == 0).float().mean() > 0.999


def test_linears_reading_one_input_share_statistics_and_solve():
    """q/k/v (and gate/up) read the same tensor: the engine feeds one accumulator per input, and the grouped
    SparseGPT solve gives the masks and weights of separate solves (checked against the reference loop above)."""
    from layerprune.engine.runner import BlockRunner
    from layerprune.engine.sequential import feed_hooks
    from layerprune.pruners.wanda import WandaPruner

    m = tiny_model("llama", layers=2, seed=5)
    ad = ModelAdapter.of(m)
    runner = BlockRunner(m, ad, torch.randint(0, 128, (4, 16)), torch.device("cpu"), batch_size=2)
    lins = ad.linears(0)
    sinks = {n: WandaPruner(lin) for n, lin in lins.items()}
    groups: dict[str, str] = {}
    with feed_hooks(lins, sinks, groups):
        runner.run(0, store=False)
    assert groups == {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                      "mlp.up_proj": "mlp.gate_proj"}
    assert sinks["self_attn.k_proj"].nseq == 0 and sinks["self_attn.q_proj"].nseq == 4  # fed once per input
    ref = {n: WandaPruner(lin) for n, lin in lins.items()}
    with feed_hooks(lins, ref):
        runner.run(0, store=False)
    for member, leader in groups.items():
        sinks[member].share_from(sinks[leader])
        assert torch.equal(sinks[member].sq, ref[member].sq)


def test_shared_inputs_found_when_the_call_order_is_not_the_module_order():
    """OPT's attention defines k_proj, v_proj, q_proj and calls q_proj first: the groups are still found (batches
    are told apart by a linear's second input, not by the first linear in module order), and every sink that is
    fed gets every batch."""
    from layerprune.engine.runner import BlockRunner
    from layerprune.engine.sequential import feed_hooks
    from layerprune.pruners.wanda import WandaPruner

    m = tiny_model("opt", layers=2, seed=5)
    ad = ModelAdapter.of(m)
    runner = BlockRunner(m, ad, torch.randint(0, 128, (5, 16)), torch.device("cpu"), batch_size=2)
    lins = ad.linears(0)
    assert list(lins)[0] == "self_attn.k_proj"
    sinks = {n: WandaPruner(lin) for n, lin in lins.items()}
    groups: dict[str, str] = {}
    with feed_hooks(lins, sinks, groups):
        runner.run(0, store=False)
    assert groups == {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj"}
    ref = {n: WandaPruner(lin) for n, lin in lins.items()}
    with feed_hooks(lins, ref):
        runner.run(0, store=False)
    for n in lins:
        if n not in groups:
            assert torch.equal(sinks[n].sq, ref[n].sq), n


def test_statistics_forward_stops_after_the_last_linear_input():
    """feed_hooks(stop=True) ends each batch's forward once every observed linear has its input: the sinks
    get exactly what a whole forward gives them, and the last linear (down_proj) never runs its matmul."""
    from layerprune.engine.runner import BlockRunner
    from layerprune.engine.sequential import feed_hooks
    from layerprune.pruners.wanda import WandaPruner

    m = tiny_model("llama", layers=2, seed=3)
    ad = ModelAdapter.of(m)
    runner = BlockRunner(m, ad, torch.randint(0, 128, (5, 16)), torch.device("cpu"), batch_size=2)
    lins = ad.linears(0)
    ran = []
    h = lins["mlp.down_proj"].register_forward_hook(lambda *a: ran.append(1))
    got, ref = {}, {}
    for stop, sinks in ((True, got), (False, ref)):
        sinks.update({n: WandaPruner(lin) for n, lin in lins.items()})
        groups: dict[str, str] = {}
        ran.clear()
        with feed_hooks(lins, sinks, groups, stop=stop):
            runner.run(0, store=False)
        assert len(ran) == (0 if stop else 3)  # three batches of 2, 2, 1
        assert groups == {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                          "mlp.up_proj": "mlp.gate_proj"}
    h.remove()
    for n in lins:
        assert got[n].nseq == ref[n].nseq and torch.equal(got[n].sq, ref[n].sq), n
    with pytest.raises(RuntimeError, match="stopped early"), feed_hooks(lins, got, stop=True):
        runner.run(0, store=True)


def test_resident_when_the_model_fits_the_accelerator(monkeypatch):
    """The whole model stays on the GPU for a pass when it plus eight blocks fit in 80% of free memory;
    never on the CPU or for a streamed model; an explicit choice wins."""
    from layerprune.engine import sequential as seq
    from layerprune.models.adapter import ModelAdapter

    m = tiny_model("llama", layers=3)
    ad = ModelAdapter.of(m)
    size = sum(p.numel() * p.element_size() for p in m.parameters())
    block = sum(p.numel() * p.element_size() for p in ad.blocks[0].parameters())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda = torch.device("cuda")
    for free, fits in (((size + 8 * block) / 0.8 * 1.01, True), ((size + 8 * block) / 0.8 * 0.99, False)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d, f=free: (int(f), int(4 * f)))
        assert seq.decide_resident(m, ad, cuda) is fits
        assert seq.decide_resident(m, ad, cuda, resident=not fits) is (not fits)
        assert seq.decide_resident(m, ad, cuda, weights=object()) is False
    assert seq.decide_resident(m, ad, torch.device("cpu"), resident=True) is False
    assert seq.model_bytes_off(m, torch.device("cpu")) == 0
