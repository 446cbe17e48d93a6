import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_model
from layerprune.errors import UserError
from layerprune.export import RunDir, open_run_dir


class _Tok:
    """Minimal tokenizer stand-in for save_pretrained in tests without text."""

    def save_pretrained(self, path):
        pass


def _prune(model, out, ids, stop_after=None):
    from layerprune.engine.sequential import prune_sequential
    from layerprune.models.adapter import ModelAdapter
    from layerprune.pruners import Pattern

    ad = ModelAdapter.of(model)
    plan = {ad.full_name(i, n): Pattern(0.5) for i in range(ad.n_blocks) for n in ad.linear_names[i]}
    def stop(i, rec):
        if stop_after is not None and i == stop_after:
            raise KeyboardInterrupt

    with open_run_dir(out, lambda: "h1", model) as rd:
        prune_sequential(model, ad, ids, plan, "sparsegpt", torch.device("cpu"), batch_size=2, checkpoint=rd,
                         progress=False, on_block=stop)
    return rd


def test_save_load_same_logits(tmp_path):
    m = tiny_model("llama", layers=3)
    ids = torch.randint(0, 128, (4, 16))
    rd = _prune(m, tmp_path / "out", ids)
    rd.finalize(m, _Tok(), {"ok": True})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(m(ids).logits, loaded(ids).logits)
    assert json.loads((tmp_path / "out" / "layerprune.json").read_text())["ok"]
    assert not (tmp_path / ".out.partial").exists()


def test_resume_gives_same_weights(tmp_path):
    ids = torch.randint(0, 128, (4, 16))
    full = tiny_model("llama", layers=4, seed=7)
    _prune(full, tmp_path / "a", ids)
    part = tiny_model("llama", layers=4, seed=7)
    with pytest.raises(KeyboardInterrupt):
        _prune(part, tmp_path / "b", ids, stop_after=1)
    assert not (tmp_path / "b").exists()  # nothing that looks complete
    assert (tmp_path / ".b.partial" / "progress.json").is_file()
    fresh = tiny_model("llama", layers=4, seed=7)
    rd = _prune(fresh, tmp_path / "b", ids)
    assert rd.done == 4
    for (k, a), (_, b) in zip(full.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


def test_out_not_empty(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep me")
    with pytest.raises(UserError):
        RunDir(tmp_path / "x", "h")
    assert (tmp_path / "x" / "f").read_text() == "keep me"
