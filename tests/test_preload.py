"""The weights read on a background thread while transformers imports (layerprune.models.preload) give the
model from_pretrained gives; what the fast path cannot reproduce goes back to from_pretrained."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

from layerprune.models import loading, preload


def _saved(tmp_path, arch, shard="200KB", tie=None):
    m = tiny_model(arch, vocab=96, layers=2)
    if tie is not None:
        m.config.tie_word_embeddings = tie
    m.generation_config.max_new_tokens = 7  # a generation config of its own, which the fast path must keep
    d = tmp_path / arch
    m.save_pretrained(d, max_shard_size=shard)
    return d


def test_read_safetensors_equals_load_file_in_any_chunking(tmp_path):
    d = _saved(tmp_path, "llama")
    files = loading.checkpoint_files(d)
    assert len(files) > 1 and (d / "model.safetensors.index.json").is_file()  # sharded: the index is followed
    for f in files:
        ref = load_file(str(f))
        for staging in (None, [torch.empty(4099, dtype=torch.uint8) for _ in range(2)],
                        [torch.empty(1 << 16, dtype=torch.uint8) for _ in range(3)]):
            got = preload.read_safetensors(f, torch.device("cpu"), None, staging=staging)
            assert got.keys() == ref.keys()
            for k in ref:
                assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape and torch.equal(got[k], ref[k])
        half = preload.read_safetensors(f, torch.device("cpu"), torch.bfloat16)
        assert all(torch.equal(half[k], ref[k].to(torch.bfloat16)) for k in ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "mistral", "opt"])
def test_from_preloaded_gives_the_model_from_pretrained_gives(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    d = _saved(tmp_path, arch, shard="10GB")
    for dtype in (torch.float32, torch.bfloat16):
        sd = {}
        for f in loading.checkpoint_files(d):
            sd.update(preload.read_safetensors(f, torch.device("cpu"), dtype))
        fast = loading.from_preloaded(d, sd, dtype)
        ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=dtype).eval()
        assert fast is not None and not fast.training
        a, b = fast.state_dict(), ref.state_dict()
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        ba, bb = dict(fast.named_buffers()), dict(ref.named_buffers())
        assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)
        tied = [(n, p) for n, p in ref.named_parameters(remove_duplicate=False)]
        assert len(list(fast.named_parameters(remove_duplicate=False))) == len(tied)
        assert sum(1 for _ in fast.parameters()) == sum(1 for _ in ref.parameters())  # the same weights tied
        assert fast.config.to_dict() == ref.config.to_dict()
        assert fast.generation_config.max_new_tokens == ref.generation_config.max_new_tokens == 7
        ids = torch.randint(0, 96, (2, 12))
        with torch.no_grad():
            assert torch.equal(fast(ids).logits, ref(ids).logits)


def test_from_preloaded_declines_what_from_pretrained_would_rename(tmp_path):
    d = _saved(tmp_path, "llama", shard="10GB")
    sd = preload.read_safetensors(d / "model.safetensors", torch.device("cpu"))
    assert loading.from_preloaded(d, {**sd, "model.extra.weight": torch.zeros(2)}, torch.float32) is None
    sd.pop("model.norm.weight")
    assert loading.from_preloaded(d, sd, torch.float32) is None


class _Done:
    """A finished preload (the real one starts only on a GPU)."""

    def __init__(self, d, dtype, tensors):
        self.key = (str(d.resolve()), dtype, "cpu")
        self.tensors, self.seconds, self.place = tensors, 1.5, torch.device("cpu")
        self.placed, self.stop = threading.Event(), threading.Event()
        self.placed.set()
        self.thread = threading.Thread(target=lambda: None)
        self.thread.start()


def test_load_model_takes_a_matching_preload_and_drops_any_other(tmp_path, monkeypatch):
    d = _saved(tmp_path, "llama", shard="10GB")
    from transformers import AutoTokenizer

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", staticmethod(lambda *a, **k: _Tok()))
    sd = preload.read_safetensors(d / "model.safetensors", torch.device("cpu"))
    marker = next(iter(sd.values()))
    p = _Done(d, torch.float32, sd)
    monkeypatch.setattr(preload, "_PENDING", {p.key: p})
    assert preload.placement(str(d), torch.float32, torch.device("cpu")) == torch.device("cpu")
    m, _ = loading.load_model(str(d), dtype=torch.float32, device="cpu")
    assert m.layerprune_load_timing["preload_seconds"] == 1.5
    assert any(q.data_ptr() == marker.data_ptr() for q in m.parameters())  # the preloaded memory, not a copy
    assert preload._PENDING == {}
    # a preload of another dtype is not what this load asks for: dropped, and from_pretrained loads
    q = _Done(d, torch.bfloat16, dict(sd))
    monkeypatch.setattr(preload, "_PENDING", {q.key: q})
    m2, _ = loading.load_model(str(d), dtype=torch.float32, device="cpu")
    assert "preload_seconds" not in m2.layerprune_load_timing and q.tensors is None and preload._PENDING == {}
    assert q.stop.is_set()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


class _Tok:
    pad_token = "<pad>"
    eos_token = "<pad>"


def test_start_does_nothing_without_a_gpu_or_a_local_checkpoint(tmp_path, monkeypatch):
    from layerprune.engine import fused

    assert fused.warm_up_process(str(tmp_path / "config.json"), torch.float16, torch.device("cpu")) is None
    monkeypatch.setattr(preload, "_PENDING", {})
    preload.start(str(tmp_path), torch.float32, torch.device("cpu"))
    preload.start("org/name", torch.float32, torch.device("cuda"))
    assert preload._PENDING == {}


def _compiled(fn) -> int:
    return sum(len(v[0]) for v in getattr(fn, "device_caches", {}).values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiles the fused Triton kernels for one); the CI machine has none")
def test_warm_up_compiles_the_kernels_the_first_forward_then_uses(tmp_path):
    from layerprune.engine import fused, fused_triton
    from layerprune.engine.runner import BlockRunner
    from layerprune.models.adapter import ModelAdapter

    m = tiny_model("llama", vocab=96, layers=2).to("cuda", torch.float16)
    cfg = tmp_path / "config.json"
    m.config.to_json_file(cfg)
    helper = fused.warm_up_process(str(cfg), torch.float16, torch.device("cuda"))  # the command line's helper
    assert helper is not None and helper.wait(timeout=300) == 0
    fused.warm_up(m.config.to_dict(), torch.float16, torch.device("cuda"))
    before = (_compiled(fused_triton._rms_norm_kernel), _compiled(fused_triton._rope_kernel))
    assert before[0] >= 1 and before[1] >= 1
    ad = ModelAdapter.of(m)
    r = BlockRunner(m, ad, torch.randint(0, 96, (4, 32)), torch.device("cuda"), batch_size=2)
    with fused.fused_ops(m, "cuda") as done:
        assert done["norms"] and done["rotary"]
        for i in range(ad.n_blocks):
            r.run(i, store=True)
    assert (_compiled(fused_triton._rms_norm_kernel), _compiled(fused_triton._rope_kernel)) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (reads through pinned memory onto it); the CI machine has none")
def test_gpu_read_and_preloaded_load_equal_from_pretrained(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = _saved(tmp_path, "llama")
    cuda = torch.device("cuda")
    for f in loading.checkpoint_files(d):
        ref = load_file(str(f))
        st = [torch.empty(5000, dtype=torch.uint8, pin_memory=True) for _ in range(2)]  # many pieces per tensor
        got = preload.read_safetensors(f, cuda, torch.float16, torch.cuda.Stream(), st)
        assert got.keys() == ref.keys() and all(torch.equal(got[k].cpu(), ref[k].half()) for k in ref)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", staticmethod(lambda *a, **k: _Tok()))
    monkeypatch.setattr(preload, "_PENDING", {})
    preload.start(str(d), torch.float16, cuda)
    assert len(preload._PENDING) == 1
    m, _ = loading.load_model(str(d), dtype=torch.float16, device=cuda)
    assert "preload_seconds" in m.layerprune_load_timing and preload._PENDING == {}
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float16, device_map={"": cuda})
    a, b = m.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.device.type == "cuda" for t in list(m.parameters()) + list(m.buffers()))


def test_discard_stops_a_read_at_its_next_piece(tmp_path):
    d = _saved(tmp_path, "llama", shard="10GB")
    stop = threading.Event()
    stop.set()
    with pytest.raises(InterruptedError):
        preload.read_safetensors(d / "model.safetensors", torch.device("cpu"), None,
                                 staging=[torch.empty(4096, dtype=torch.uint8)], stop=stop)


def test_command_end_reaps_its_helpers_and_drops_an_untaken_preload(tmp_path, monkeypatch):
    import subprocess
    import sys

    from layerprune import cli

    d = _saved(tmp_path, "llama", shard="10GB")
    p = _Done(d, torch.float32, {})
    monkeypatch.setattr(preload, "_PENDING", {p.key: p})
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(cli, "_HELPERS", [sleeper, None])
    assert cli.main(["prune", str(d), "--sparsity", "2"]) == 2  # refused before loading: nothing took the preload
    assert preload._PENDING == {} and p.stop.is_set() and p.tensors is None
    assert sleeper.poll() is not None and cli._HELPERS == []


def _word_level_dir(tmp_path):
    """A tiny LLaMA with a word-level tokenizer of its own (no packaged model needed on the GPU machine)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    d = _saved(tmp_path, "llama", shard="10GB")
    words = "the of and to in a is that for it as was with on by he at from his an".split()
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>", eos_token="</s>").save_pretrained(d)
    return d


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the command line preloads onto one only); the CI machine has none")
def test_cli_prune_with_the_preload_gives_the_run_without_it(tmp_path, monkeypatch, capsys):
    import json

    from layerprune import cli

    d = _word_level_dir(tmp_path)
    argv = ["prune", str(d), "--device", "cuda", "--dtype", "bfloat16", "--sparsity", "0.5", "--pruner", "wanda", "--allocation",
            "dlp", "--nsamples", "4", "--seqlen", "64", "--eval", "wikitext2", "--eval-max-windows", "2", "--json",
            "--quiet", "--no-cache"]
    recs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("LAYERPRUNE_PRELOAD", flag)
        assert cli.main(argv) == 0
        recs.append(json.loads(capsys.readouterr().out))
    on, off = recs
    assert "preload_seconds" in on["timing"] and "preload_seconds" not in off["timing"]
    assert on["per_block"] == off["per_block"] and on["ppl"] == off["ppl"]


def test_gpu_warm_up_shapes_and_when_it_starts(tmp_path):
    """The warm-up covers each distinct linear shape of a block once (grouped-query attention, an explicit head
    size); it runs on the CPU path too (a bfloat16 attention with fewer key/value heads); it does not start for a
    CPU device, a float32 run or a config it cannot read."""
    import json

    from layerprune.engine import warm

    cfg = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 96}
    assert warm.block_shapes(cfg) == [(64, 64), (64, 96), (64, 128), (96, 64), (128, 64)]
    warm.warm_up_gpu(cfg, torch.bfloat16, torch.device("cpu"), tokens=32, seqlen=16)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert warm.start(tmp_path / "config.json", torch.bfloat16, torch.device("cpu"), 32, 16) is None
    assert warm.start(tmp_path / "config.json", torch.float32, torch.device("cuda"), 32, 16) is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert warm.start(tmp_path / "config.json", torch.bfloat16, torch.device("cuda"), 32, 16) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (warms cuBLAS and attention on it); the CI machine has none")
def test_gpu_warm_up_thread_waits_for_placement_and_leaves_nothing_allocated(tmp_path):
    import json

    from layerprune.engine import warm

    cfg = {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 1376}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    before = torch.cuda.memory_allocated()
    placed = threading.Event()
    t = warm.start(tmp_path / "config.json", torch.bfloat16, torch.device("cuda"), 4096, 2048, after=placed)
    t.join(0.2)
    assert t.is_alive()  # waits for the preload's placement
    placed.set()
    t.join()
    assert torch.cuda.memory_allocated() == before
