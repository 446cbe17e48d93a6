"""LoRA recovery and quantization keep the sparsity (issue: recovery and composition)."""


import pytest
import torch

from conftest import tiny_model
from layerprune.engine.sequential import prune_sequential
from layerprune.errors import UserError
from layerprune.finetune import apply_masks, finetune, masks_of, merge_keep_mask
from layerprune.models.adapter import ModelAdapter
from layerprune.pruners import Pattern
from layerprune.quantize import quantize_model, quantize_tensor


def pruned_tiny(vocab=128, seed=0):
    m = tiny_model("llama", vocab=vocab, layers=2, seed=seed)
    ad = ModelAdapter.of(m)
    plan = {ad.full_name(i, n): Pattern(0.6) for i in range(ad.n_blocks) for n in ad.linear_names[i]}
    prune_sequential(m, ad, None, plan, "magnitude", torch.device("cpu"), progress=False)
    return m


@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 16), (8, 32), (4, 48)])
def test_quantize_keeps_zeros_and_bounded_error(bits, group):
    w = torch.randn(32, 64)
    w[torch.rand_like(w) < 0.5] = 0
    q = quantize_tensor(w, bits, group)
    assert torch.equal(q == 0, (w == 0) | (q == 0)) and bool((q[w == 0] == 0).all())
    # round-to-nearest: error at most half a step of each group's scale
    g = group or 64
    for s0 in range(0, 64, g):  # the last group may be shorter (48 → 48 + 16)
        x, e = w[:, s0:s0 + g], (q - w)[:, s0:s0 + g].abs()
        step = (x.max(1).values.clamp(min=0) - x.min(1).values.clamp(max=0)) / (2**bits - 1)
        assert (e.max(1).values <= step / 2 + 1e-6).all()


def test_quantize_model_preserves_sparsity():
    m = pruned_tiny()
    before = {k: v.clone() for k, v in masks_of(m).items()}
    rec = quantize_model(m, "int4", 16)
    after = masks_of(m)
    for k in before:
        assert torch.equal(before[k] | after[k], before[k])  # no pruned weight came back
    assert rec["size"]["sparse_quantized_bytes"] < rec["size"]["dense_bytes"]
    with pytest.raises(UserError):
        quantize_model(m, "int3")


@pytest.mark.parametrize("mode", ["separate", "masked-lora", "merge"])
def test_lora_keeps_sparsity_and_lowers_loss(mode, smol_tokenizer):
    m = pruned_tiny(vocab=len(smol_tokenizer), seed=1)
    masks = {k: v.clone() for k, v in masks_of(m).items()}
    w0 = {k: v.clone() for k, v in m.state_dict().items()}
    pm, rec = finetune(m, smol_tokenizer, steps=25, lr=3e-3, seqlen=64, batch_size=4, mode=mode, progress=False)
    assert sum(rec["losses"][-5:]) / 5 < sum(rec["losses"][:5]) / 5
    if mode == "separate":
        base = pm.unload()
    else:
        base = merge_keep_mask(pm, masks, mode)
        if mode == "merge":
            apply_masks(base, masks)
    after = masks_of(base)
    for k in masks:
        assert torch.equal(after[k] & ~masks[k], torch.zeros_like(masks[k])), k  # zeros survive exactly
    if mode != "separate":  # the merged update really changed some kept weights
        sd = base.state_dict()
        assert any(not torch.equal(sd[k], w0[k]) for k in w0 if k.endswith("q_proj.weight"))


def test_lora_bad_target(smol_tokenizer):
    m = pruned_tiny(vocab=len(smol_tokenizer))
    with pytest.raises(UserError, match="does not exist"):
        finetune(m, smol_tokenizer, steps=1, targets=["nope_proj"], progress=False)


def test_finetune_cli_rejects_non_layerprune_dir(tmp_path, capsys):
    from layerprune.cli import main

    assert main(["finetune", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a layerprune output" in capsys.readouterr().err


def test_masked_lora_merge_is_the_trained_function(smol_tokenizer):
    """The masked adapter's output equals the merged model's output (evaluation keeps the mask)."""
    from layerprune.evaluation.perplexity import evaluate_ppl

    m = pruned_tiny(vocab=len(smol_tokenizer), seed=2)
    masks = {k: v.clone() for k, v in masks_of(m).items()}
    pm, _ = finetune(m, smol_tokenizer, steps=5, lr=1e-2, seqlen=32, batch_size=2, mode="masked-lora", progress=False)
    ids = torch.randint(0, len(smol_tokenizer), (2, 16))
    evaluate_ppl(pm, smol_tokenizer, [], 16, None, torch.device("cpu"))  # must not strip the masked forward
    with torch.no_grad():
        a = pm(input_ids=ids).logits
        merged = merge_keep_mask(pm, masks, "masked-lora")
        b = merged(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
