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
    (["--out", "X", "--allocation", "alphapruning"], "--stream supports uniform, dlp, owl and svnup"),
])
def test_stream_refusals(tiny_dir, tmp_path, capsys, extra, needle):
    args = ["prune", str(tiny_dir), "--sparsity", "0.5", "--stream", "--device", "cpu"]
    args += [str(tmp_path / e) if e == "X" else e for e in extra]
    assert main(args) == 2
    assert needle in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("background,absent,window", [("pruned", "pruned", 2), ("dense", "pruned", 2),
                                                      ("pruned", "removed", 3)])
def test_streamed_svnup_game_equals_in_memory(tiny_dir, tmp_path, capsys, monkeypatch, background, absent, window):
    """SV-NUP on a streamed model: the pruned copies go to a scratch folder on disk and each block run reads its
    block (dense from the checkpoint, pruned from the scratch), so φ, the allocation and the pruned model are
    those of the in-memory game; at most one block is ever loaded, and the scratch is gone afterwards."""
    from layerprune.models import streaming

    loads = []
    real = streaming.BlockWeights.load

    def counting(self, i, block, tensors=None):
        real(self, i, block, tensors)
        loads.append(len(self.loaded))

    monkeypatch.setattr(streaming.BlockWeights, "load", counting)
    args = [a if a != "dlp" else "svnup" for a in ARGS] + ["--window", str(window), "--sv-samples", "3",
                                                           "--sv-seqlen", "24", "--background", background,
                                                           "--absent", absent]
    assert main(["prune", str(tiny_dir), *args, "--out", str(tmp_path / "mem")]) == 0
    mem = json.loads(capsys.readouterr().out)
    assert main(["prune", str(tiny_dir), *args, "--stream", "--out", str(tmp_path / "str")]) == 0
    st = json.loads(capsys.readouterr().out)
    dm, ds = mem["allocation"]["diagnostics"], st["allocation"]["diagnostics"]
    assert ds["streamed"] is True and dm["streamed"] is False
    assert ds["evaluations"] == dm["evaluations"] == (3 - window + 1) * (2**window - 1) + 1  # E(L = 3, w)
    # breadth first, a window reads each of its players twice and each later block once (plus the prefix cache,
    # the shared pattern's one evaluation and, for a pruned background or absence, the copies' pass)
    assert 0 < ds["block_reads"] < dm["evaluations"] * 3
    if (background, absent, window) == ("pruned", "pruned", 2):
        # the all-pruned pattern once (blocks 0-2: 3); window (0, 1): players 2 + 2, block 2 once for all three
        # coalitions (1); window (1, 2): the prefix cache's block 0 (1), players 2 + 2. Depth first would read 17.
        assert ds["block_reads"] == 3 + 5 + 5
    assert ds["phi"] == dm["phi"]  # the same payoffs, bit for bit
    assert st["per_block"] == pytest.approx(mem["per_block"])
    assert loads and max(loads) == 1
    assert st["ppl"]["wikitext2"] == pytest.approx(mem["ppl"]["wikitext2"], rel=1e-4)
    assert not (tmp_path / ".str.partial").exists() and (tmp_path / "str" / "model.safetensors.index.json").is_file()


def test_streamed_svnup_refuses_a_disk_without_room_for_the_copies(tmp_path, monkeypatch):
    """The game's pruned copies (removed before the pruning pass writes anything) are checked against the disk
    before any work: too little room for the larger of the two is one line with the sizes and the fix."""
    import shutil
    from collections import namedtuple
    from types import SimpleNamespace

    from torch import nn

    from layerprune import api
    from layerprune.errors import UserError

    blocks = [nn.Linear(256, 256, bias=False) for _ in range(2)]  # 2 × 256 KiB in fp32
    session = SimpleNamespace(adapter=SimpleNamespace(blocks=blocks))
    run_dir = SimpleNamespace(need=2**18, partial=tmp_path)  # the run's own output: 256 KiB
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(0, 0, 2**19))  # 512 KiB < 1.02 × the 512 KiB copies
    with pytest.raises(UserError, match=r"a pruned copy of every block \(0.00 GiB, removed before the pruning "
                                        r"writes the run's 0.00 GiB\), but only 0.00 GiB are free"):
        api.stream_scratch(session, run_dir, tmp_path / "out")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(0, 0, 2**19 + 2**15))  # the larger of the two fits
    assert api.stream_scratch(session, run_dir, tmp_path / "out") == tmp_path / "sv_copies"
