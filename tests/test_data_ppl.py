import math
import random

import pytest
import torch

from layerprune.data.calibration import sample_windows
from layerprune.data.sources import load_documents, load_text
from layerprune.errors import UserError
from layerprune.data.calibration import token_windows
from layerprune.evaluation.perplexity import perplexity_of_windows


class _Enc(dict):
    __getattr__ = dict.__getitem__


class CharTok:
    """Character-level tokenizer for protocol tests; like a Hugging Face tokenizer it takes a text or a list
    of texts (then lists of ids)."""

    def __call__(self, text, return_tensors=None):
        if isinstance(text, list):
            return _Enc(input_ids=[[ord(c) % 128 for c in t] for t in text])
        return _Enc(input_ids=torch.tensor([[ord(c) % 128 for c in text]]))


def test_sampler_follows_reference_protocol():
    docs = ["a" * 5, "b" * 50, "c" * 12, "d" * 40]
    ids, doc_ids = sample_windows(docs, CharTok(), 6, 10, seed=0)
    # replay the reference loop with Python's random
    rng = random.Random(0)
    for k in range(6):
        while True:
            i = rng.randint(0, 3)
            if len(docs[i]) > 10:
                break
        j = rng.randint(0, len(docs[i]) - 10 - 1)
        assert doc_ids[k] == i
        assert ids[k].tolist() == [ord(c) % 128 for c in docs[i][j:j + 10]]


def test_sampler_exclusion_and_errors():
    docs = ["x" * 30, "y" * 30]
    _, d = sample_windows(docs, CharTok(), 4, 10, 0, exclude={0})
    assert set(d) == {1}
    with pytest.raises(UserError):
        sample_windows(["short"], CharTok(), 1, 10, 0, max_tries=100)
    with pytest.raises(UserError):
        sample_windows(docs, CharTok(), 0, 10, 0)


def test_local_sources():
    assert len(load_documents("wikitext2", "test")) == 4358
    assert len(load_documents("c4", "calib")) == 1000
    assert len(load_documents("ptb", "test")) == 3761
    import hashlib

    joined = load_text("wikitext2").encode()  # the reference "\n\n".join, sha256 from the data README
    assert hashlib.sha256(joined).hexdigest().startswith("696cca6b65a171b0")
    with pytest.raises(UserError):
        load_documents("nope")


def test_perplexity_protocol_known_answer(llama):
    windows = torch.randint(0, 128, (3, 16))
    got = perplexity_of_windows(llama, windows, batch_size=2, device="cpu")
    with torch.no_grad():
        tot = 0.0
        for w in windows:
            lg = llama(input_ids=w[None]).logits[0, :-1]
            tot += float(torch.nn.functional.cross_entropy(lg, w[1:])) * 16
    assert got == pytest.approx(math.exp(tot / (3 * 16)), rel=1e-5)


def test_windows_drop_remainder():
    w = token_windows(CharTok(), "z" * 35, 10)
    assert w.shape == (3, 10)


def test_blockwise_perplexity_equals_the_whole_model_and_is_chosen_when_the_model_does_not_fit(
        tiny_with_tok, monkeypatch):
    """A model that does not fit on the GPU is evaluated one block at a time through the engine: the same
    perplexity as the whole model (reference protocol), and the model stays in host memory."""
    import importlib

    P = importlib.import_module("layerprune.evaluation.perplexity")  # the package exports a function of that name
    model, tok = tiny_with_tok
    cpu = torch.device("cpu")
    whole = P.evaluate_ppl(model, tok, ["wikitext2"], 32, 6, cpu, blockwise=False)["wikitext2"]
    block = P.evaluate_ppl(model, tok, ["wikitext2"], 32, 6, cpu, blockwise=True)["wikitext2"]
    assert block["blockwise"] and block["windows"] == whole["windows"] == 6
    assert block["ppl"] == pytest.approx(whole["ppl"], rel=1e-5)
    assert all(p.device.type == "cpu" for p in model.parameters())
    # the choice: the bytes to move plus a batch's logits and 1 GiB, against 90% of the free memory
    cuda = torch.device("cuda", 0)
    nbytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    need = nbytes + 8 * 2 * 32 * model.config.vocab_size + 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (int(need / 0.9) + 64, 1 << 40))
    assert P.fits_for_eval(model, cuda, 2, 32)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (int(need / 0.9) - 64, 1 << 40))
    assert not P.fits_for_eval(model, cuda, 2, 32)
    assert P.fits_for_eval(model, cpu, 2, 32)


def test_eval_windows_tokenise_once_per_tokenizer_and_settings():
    """A grid evaluates the same texts after every cell: the windows are tokenised once per tokenizer object and
    (dataset, seqlen, max_windows); C4 keeps the reference's 256-window cap; another tokenizer is not served
    the first one's windows."""
    from layerprune.evaluation.perplexity import eval_windows

    class Counting(CharTok):
        calls = 0

        def __call__(self, text, return_tensors=None):
            Counting.calls += 1
            return super().__call__(text, return_tensors)

    a, b = Counting(), Counting()
    w1 = eval_windows(a, "wikitext2", 64, 3)
    w2 = eval_windows(a, "wikitext2", 64, 3)
    assert w1 is w2 and w1.shape == (3, 64) and Counting.calls == 1
    assert eval_windows(a, "wikitext2", 32, 3).shape == (3, 32) and Counting.calls == 2
    assert torch.equal(eval_windows(b, "wikitext2", 64, 3), w1) and Counting.calls == 3
    assert eval_windows(a, "c4", 16, None).shape[0] == 256 and eval_windows(a, "c4", 16, 999).shape[0] == 256
    assert Counting.calls == 4  # both C4 requests are the capped 256 windows: one tokenisation


def test_prefetch_gives_the_calls_results_once_and_keeps_the_tokenizer_single_threaded():
    """Background jobs give exactly what the calls give; a failing job leaves no result (the consumer repeats
    the call, so its error surfaces where it always did); a job that itself tokenises does not wait on its own
    thread; a tokenising call on the main thread waits for the jobs first."""
    import threading
    import time

    from layerprune.data import prefetch
    from layerprune.data.calibration import sample_c4_windows

    class Watched(CharTok):
        busy = 0
        overlap = False

        def __call__(self, text, return_tensors=None):
            Watched.busy += 1
            Watched.overlap |= Watched.busy > 1
            time.sleep(0.01)
            try:
                return super().__call__(text, return_tensors)
            finally:
                Watched.busy -= 1

    tok = Watched()
    started = threading.Event()

    def calib():
        started.set()
        return sample_c4_windows(tok, 4, 32, 0, "c4")

    def boom():
        raise UserError("no such data")

    prefetch.start(tok, {"calib": calib, "bad": boom, "text": lambda: token_windows(tok, "ab " * 200, 16)})
    started.wait(5)
    direct = token_windows(tok, "xyz " * 100, 8)  # waits for the jobs: never two tokenisations at once
    assert not Watched.overlap and direct.shape == (50, 8)
    got = prefetch.take(tok, "calib")
    assert torch.equal(got.input_ids, sample_c4_windows(Watched(), 4, 32, 0, "c4").input_ids)
    assert prefetch.take(tok, "calib") is None and prefetch.take(tok, "bad") is None
    assert torch.equal(prefetch.take(tok, "text"), token_windows(CharTok(), "ab " * 200, 16))
    assert prefetch.take(CharTok(), "calib") is None  # another tokenizer has no jobs


def test_prune_prefetches_calibration_and_windows_with_the_same_result(tiny_dir, monkeypatch):
    """prune(spec) tokenises the calibration set and the evaluation windows while the weights load; the
    record says so, and the result is the one without the background thread."""
    from layerprune import api

    kw = dict(sparsity=0.5, pruner="wanda", allocation="dlp", nsamples=4, seqlen=32, eval=["wikitext2"],
              eval_max_windows=2, device="cpu", progress=False, use_cache=False)
    rec = api.prune(str(tiny_dir), **kw)
    tm = rec["timing"]
    assert tm["prefetch_seconds"] > 0 and {"load_import_seconds", "load_tokenizer_seconds",
                                           "load_weights_seconds"} <= set(tm)
    uni = api.prune(str(tiny_dir), **{**kw, "allocation": "uniform", "pruner": "magnitude"})
    assert uni["timing"]["prefetch_seconds"] > 0  # no calibration job: the evaluation windows alone
    monkeypatch.setattr(api, "start_prefetch", lambda *a, **k: None)
    plain = api.prune(str(tiny_dir), **kw)
    assert "prefetch_seconds" not in plain["timing"]
    assert rec["ppl"] == plain["ppl"] and rec["per_block"] == plain["per_block"]


def test_sampler_tokenising_ahead_draws_what_one_call_per_document_draws(smol_tokenizer):
    """The batched look-ahead only fills the token cache: with the real tokenizer and the local C4 documents
    the windows and documents are those of the reference loop (one tokenizer call per drawn document)."""
    docs = load_documents("c4", "calib")
    for seed, n, seqlen in ((0, 6, 1024), (3, 4, 256)):
        rng, cache, want, wdocs = random.Random(seed), {}, [], []
        for _ in range(n):
            while True:
                i = rng.randint(0, len(docs) - 1)
                if i not in cache:
                    cache[i] = smol_tokenizer(docs[i], return_tensors="pt").input_ids[0]
                if cache[i].shape[0] > seqlen:
                    break
            j = rng.randint(0, cache[i].shape[0] - seqlen - 1)
            want.append(cache[i][j:j + seqlen])
            wdocs.append(i)
        ids, doc_ids = sample_windows(docs, smol_tokenizer, n, seqlen, seed)
        assert doc_ids == wdocs and torch.equal(ids, torch.stack(want))


def test_prefetch_take_waits_for_its_own_job_only():
    """The calibration set is taken while the evaluation texts are still being tokenised; a tokenising call
    still waits for every job."""
    import threading

    from layerprune.data import prefetch

    tok, release = CharTok(), threading.Event()
    prefetch.start(tok, {"calib": lambda: "windows", "eval": lambda: release.wait(30) and "texts"})
    assert prefetch.take(tok, "calib") == "windows"  # returns although "eval" is still running
    run = prefetch._get(tok)
    assert run.thread.is_alive() and not run.done["eval"].is_set()
    release.set()
    prefetch.settle(tok)
    assert not run.thread.is_alive() and prefetch.take(tok, "eval") == "texts"
