"""Models larger than host memory: blocks read from safetensors only while pruned, the output written shard by
shard, perplexity block by block — the same model and numbers as the in-memory run."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerprune.cli import main

ARGS = ["--sparsity", "0.6", "--pruner", "sparsegpt", "--allocation", "dlp", "--nsamples", "4", "--seqlen", "32",
        "--eval", "wikitext2", "--eval-max-windows", "3", "--device", "cpu", "--json", "--quiet", "--no-cache"]


def test_streamed_prune_equals_in_memory(tiny_dir, tmp_path, capsys, monkeypatch):
    from layerprune.models import streaming

    loads = []
    real = streaming.BlockWeights.load

    def counting(self, i, block, tensors=None):
        real(self, i, block, tensors)
        loads.append((len(self.loaded), tensors is not None))

    monkeypatch.setattr(streaming.BlockWeights, "load", counting)
    assert main(["prune", str(tiny_dir), *ARGS, "--out", str(tmp_path / "mem")]) == 0
    mem = json.loads(capsys.readouterr().out)
    assert main(["prune", str(tiny_dir), *ARGS, "--stream", "--out", str(tmp_path / "str")]) == 0
    st = json.loads(capsys.readouterr().out)
    assert loads and max(n for n, _ in loads) == 1  # never more than one block's weights in memory
    assert sum(ck for _, ck in loads) == 3  # the evaluation reads each pruned block from its checkpoint only
    assert st["per_block"] == pytest.approx(mem["per_block"])
    assert st["sparsity"]["achieved"] == mem["sparsity"]["achieved"]
    assert st["ppl"]["wikitext2"] == pytest.approx(mem["ppl"]["wikitext2"], rel=1e-4)
    assert st["ppl_details"]["wikitext2"]["streamed"] is True
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "str").eval()
    for (k, x), (k2, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(x, y), k
    assert (tmp_path / "str" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / ".str.partial").exists()


@pytest.mark.parametrize("extra,needle", [
    ([], "--stream writes each pruned block to --out"),
    (["--out", "X", "--allocation", "svnup"], "--stream supports uniform, dlp and owl"),
])
def test_stream_refusals(tiny_dir, tmp_path, capsys, extra, needle):
    args = ["prune", str(tiny_dir), "--sparsity", "0.5", "--stream", "--device", "cpu"]
    args += [str(tmp_path / e) if e == "X" else e for e in extra]
    assert main(args) == 2
    assert needle in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
