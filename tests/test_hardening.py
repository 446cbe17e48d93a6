"""The output directory under stress: a second run on one --out, damaged checkpoints, a full disk,
validation before loading, and no debris on refusal."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from conftest import tiny_model
from layerprune.cli import main
from layerprune.errors import RunFailure, UserError
from layerprune.export import RunDir, open_run_dir


def _prune(model, out, ids, stop_after=None, hash_="h1"):
    from layerprune.engine.sequential import prune_sequential
    from layerprune.models.adapter import ModelAdapter
    from layerprune.pruners import Pattern

    ad = ModelAdapter.of(model)
    plan = {ad.full_name(i, n): Pattern(0.5) for i in range(ad.n_blocks) for n in ad.linear_names[i]}

    def stop(i, rec):
        if stop_after is not None and i == stop_after:
            raise KeyboardInterrupt

    with open_run_dir(out, lambda: hash_, model) as rd:
        prune_sequential(model, ad, ids, plan, "wanda", torch.device("cpu"), batch_size=2, checkpoint=rd,
                         progress=False, on_block=stop)
    return rd


def _interrupted(tmp_path, ids):
    with pytest.raises(KeyboardInterrupt):
        _prune(tiny_model("llama", layers=4, seed=7), tmp_path / "b", ids, stop_after=2)
    return tmp_path / ".b.partial"


def test_second_run_on_same_out_refuses_naming_the_other(tiny_dir, tmp_path, capsys):
    holder = RunDir(tmp_path / "o", "other-args")  # a live run holding .o.partial
    try:
        code = main(["prune", str(tiny_dir), "--sparsity", "0.6", "--pruner", "magnitude", "--eval", "",
                     "--device", "cpu", "--seqlen", "32", "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and "another layerprune run (pid" in err and "Traceback" not in err
        assert json.loads((holder.partial / "owner.json").read_text())["args_hash"] == "other-args"
        assert (holder.partial / "progress.json").is_file()  # untouched
    finally:
        holder.close()
    assert main(["prune", str(tiny_dir), "--sparsity", "0.6", "--pruner", "magnitude", "--eval", "", "--quiet",
                 "--device", "cpu", "--seqlen", "32", "--out", str(tmp_path / "o")]) == 0  # free again: it runs


@pytest.mark.parametrize("damage", ["delete", "truncate", "other-args"])
def test_damaged_checkpoint_is_refused_with_the_fix(tmp_path, damage):
    ids = torch.randint(0, 128, (4, 16))
    part = _interrupted(tmp_path, ids)
    f = part / "blocks" / "block_1.safetensors"
    if damage == "delete":
        f.unlink()
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        j = part / "blocks" / "block_1.json"
        j.write_text(json.dumps({**json.loads(j.read_text()), "args_hash": "someone-else"}))
    with pytest.raises(UserError, match=r"checkpoint .*block_1.* is damaged .*delete .*\.b\.partial"):
        _prune(tiny_model("llama", layers=4, seed=7), tmp_path / "b", ids)
    assert part.is_dir()  # refused, not deleted: the user decides


def test_disk_full_is_one_line_and_resumable(tmp_path, monkeypatch):
    import layerprune.export as export

    ids = torch.randint(0, 128, (4, 16))
    full = tiny_model("llama", layers=4, seed=7)
    _prune(full, tmp_path / "a", ids)
    real = export.save_file
    calls = {"n": 0}

    def failing(sd, path):
        calls["n"] += 1
        if calls["n"] == 3:
            with open(path, "wb") as fh:
                fh.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(sd, path)

    monkeypatch.setattr(export, "save_file", failing)
    with pytest.raises(RunFailure, match="disk full while writing .*block_2.safetensors.*rerun the same command"):
        _prune(tiny_model("llama", layers=4, seed=7), tmp_path / "b", ids)
    part = tmp_path / ".b.partial"
    assert json.loads((part / "progress.json").read_text())["done"] == 2
    assert not list((part / "blocks").glob(".*tmp"))  # the half-written file is gone
    monkeypatch.setattr(export, "save_file", real)
    fresh = tiny_model("llama", layers=4, seed=7)
    assert _prune(fresh, tmp_path / "b", ids).done == 4
    for (k, a), (_, b) in zip(full.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k


def test_not_enough_disk_refused_up_front_without_debris(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    du = namedtuple("du", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: du(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match=r"writes about .* GiB .* only 0.00 GiB are free"):
        _prune(tiny_model("llama", layers=2), tmp_path / "c", torch.randint(0, 128, (2, 8)))
    assert not (tmp_path / ".c.partial").exists() and not (tmp_path / "c").exists()


def test_validation_before_load_and_no_debris(tmp_path, capsys, monkeypatch):
    """An invalid option is refused before the model is even looked at and before --out is created."""
    import layerprune.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(["prune", "org/does-not-exist", "--sparsity", "0.5", "--allocation", "dlp", "--alpha", "-0.1",
                 "--dense-ppl", "--eval", "wikitext2", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--alpha must be in (0, 0.5)" in err
    assert list(tmp_path.iterdir()) == []


def test_refusal_after_load_leaves_no_partial_dir(tiny_dir, tmp_path, capsys):
    code = main(["prune", str(tiny_dir), "--allocation", "svnup", "--window", "9", "--sparsity", "0.5",
                 "--device", "cpu", "--seqlen", "32", "--nsamples", "2", "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert code == 2 and "--window 9 must be between 1" in err
    assert list(tmp_path.iterdir()) == []


def test_finetune_zero_steps_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import sys

    ppl = sys.modules["layerprune.evaluation.perplexity"]

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.json").write_text("{}")
    (tmp_path / "p" / "layerprune.json").write_text("{}")
    monkeypatch.setattr(ppl, "evaluate_ppl", lambda *a, **k: pytest.fail("evaluated before validating"))
    code = main(["finetune", str(tmp_path / "p"), "--steps", "0", "--out", str(tmp_path / "o")])
    assert code == 2 and "--steps must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


@pytest.mark.parametrize("args,needle", [
    (["--eval-seqlen", "100000"], "--eval-seqlen 100000 is beyond the model's context"),
    (["--eval-max-windows", "0"], "--eval-max-windows must be at least 1"),
])
def test_messages_name_the_right_flag(tiny_dir, capsys, args, needle):
    code = main(["prune", str(tiny_dir), "--sparsity", "0.5", "--device", "cpu", "--seqlen", "32", *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err


@pytest.mark.parametrize("with_out", [True, False])
def test_ctrl_c_message_mentions_resume_only_with_out(tmp_path, capsys, monkeypatch, with_out):
    import layerprune.cli.commands as commands

    def interrupted(a):
        raise KeyboardInterrupt

    monkeypatch.setitem(commands.COMMANDS, "prune", interrupted)
    extra = ["--out", str(tmp_path / "o")] if with_out else []
    assert main(["prune", "smollm2-135m", "--sparsity", "0.5", *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("layerprune: interrupted")
    assert ("resume" in err[0]) == with_out


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_shard_refused_before_any_work(tiny_dir, tmp_path, capsys, damage):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    f = d / "model.safetensors"
    if damage == "missing":
        f.unlink()
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model.safetensors"}}))
    else:
        f.write_bytes(f.read_bytes()[:-100])
    code = main(["prune", str(d), "--sparsity", "0.5", "--device", "cpu", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and str(f) in err and ("missing" in err or "truncated" in err), err
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_load_placement_reads_sizes_from_headers_and_picks_the_gpu_only_when_it_fits(tiny_dir, monkeypatch):
    """A local checkpoint is loaded straight onto the GPU when its bytes (from the safetensors headers, in the
    run's dtype) plus eight blocks fit in 80% of the free memory; otherwise, on the CPU, and for a CPU run."""
    import torch

    from transformers import AutoModelForCausalLM

    from layerprune.models import loading

    loaded = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    n = sum(t.numel() for k, t in loaded.state_dict().items() if k != "lm_head.weight" or not loaded.config.tie_word_embeddings)
    assert loading.checkpoint_bytes(tiny_dir, torch.bfloat16) == 2 * n
    assert loading.checkpoint_bytes(tiny_dir, torch.float32) == 4 * n
    need = 2 * n * (1 + 8 / 3)
    cuda = torch.device("cuda", 0)
    assert loading.load_placement(str(tiny_dir), torch.bfloat16, torch.device("cpu")).type == "cpu"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (int(need / 0.8) + 16, 1 << 40))
    assert loading.load_placement(str(tiny_dir), torch.bfloat16, cuda) == cuda
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (int(need / 0.8) - 16, 1 << 40))
    assert loading.load_placement(str(tiny_dir), torch.bfloat16, cuda).type == "cpu"
    assert loading.load_placement("org/not-local", torch.bfloat16, cuda).type == "cpu"  # a hub id: unknown size
