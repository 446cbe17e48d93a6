import numpy as np
import pytest
import torch

from conftest import tiny_model
from layerprune.allocation import AllocContext, clip_and_restore, mixed_nm
from layerprune.allocation.alphapruning import allocate_alphapruning, alphapruning_sparsities, hill_alpha
from layerprune.allocation.dlp import DLPOptions
from layerprune.allocation.dlp import allocate_dlp, dlp_sparsities
from layerprune.allocation.owl import owl_sparsities
from layerprune.allocation.stats import dense_stats_pass
from layerprune.errors import UserError
from layerprune.models.adapter import ModelAdapter


def test_dlp_band_exactly_2alpha_and_mean():
    S = np.array([0.3, 0.5, 0.45, 0.9, 1.2, 0.7])
    s, d = dlp_sparsities(S, 0.7, 0.15)
    assert s.max() - s.min() == pytest.approx(0.30)
    assert s.mean() == pytest.approx(0.7)
    assert np.argmax(s) == np.argmax(S) and np.argmin(s) == np.argmin(S)  # larger S → pruned more
    # known answer: s = p + mean(d) - d with d = 2α (Smax - S)/(Smax - Smin)
    dd = 0.3 * (S.max() - S) / (S.max() - S.min())
    assert np.allclose(s, 0.7 + dd.mean() - dd)


def test_dlp_scale_and_shift_invariant():
    S = np.random.default_rng(0).random(10)
    a, _ = dlp_sparsities(S, 0.6, 0.1)
    b, _ = dlp_sparsities(S * 37.0, 0.6, 0.1)
    assert np.allclose(a, b)


def test_dlp_flat_falls_back_to_uniform(caplog):
    s, d = dlp_sparsities(np.ones(5), 0.5, 0.15)
    assert np.allclose(s, 0.5) and d["degenerate"]
    assert "uniform" in caplog.text


def test_clip_and_restore_keeps_weighted_mean():
    s = np.array([1.05, 0.95, 0.6, 0.4, 0.5])
    w = np.array([1.0, 2.0, 1.0, 3.0, 1.0])
    out = clip_and_restore(s, w, 0.8, 0.01, 0.99)
    assert (out <= 0.99).all() and (out >= 0.01).all()
    assert (out * w).sum() / w.sum() == pytest.approx(0.8)
    with pytest.raises(UserError):
        clip_and_restore(s, w, 0.995, 0.01, 0.99)


def test_owl_known_answer():
    D = np.array([1.0, 3.0, 2.0])
    s = owl_sparsities(D, 0.7, 0.08)
    t = 0.16 * np.array([0.0, 1.0, 0.5])
    assert np.allclose(s, 0.7 - (t - t.mean()))


def test_hill_recovers_power_law_exponent():
    rng = np.random.default_rng(0)
    alpha = 2.5
    x = (1 - rng.random(4000)) ** (-1 / (alpha - 1))  # Pareto with pdf ∝ x^-alpha, xmin = 1
    est, _ = hill_alpha(torch.tensor(x), xmin_window="intended")
    assert est == pytest.approx(alpha, abs=0.15)


def test_alphapruning_weighted_mean_and_order():
    a = np.array([2.0, 3.0, 4.0, 5.0])
    n = np.array([10.0, 40.0, 10.0, 40.0])
    s = alphapruning_sparsities(a, n, 0.6, 0.3)
    assert (s * n).sum() / n.sum() == pytest.approx(0.6)
    assert np.all(np.diff(s) > 0)  # larger alpha → more sparsity


def _ctx(model, ids):
    ad = ModelAdapter.of(model)
    stats = dense_stats_pass(model, ad, ids, torch.device("cpu"), batch_size=2, progress=False)
    return AllocContext(ad, dense_stats=lambda need="full": stats, extra={"device": torch.device("cpu")})


@pytest.mark.parametrize("gran", ["block", "linear"])
def test_dlp_on_model_weighted_mean(gran):
    m = tiny_model("llama", layers=5)
    ctx = _ctx(m, torch.randint(0, 128, (4, 32)))
    al = allocate_dlp(ctx, 0.7, DLPOptions(0.15, "median", gran))
    sizes = ctx.adapter.linear_sizes()
    mean = sum(al.per_linear[k] * sizes[k] for k in sizes) / sum(sizes.values())
    assert mean == pytest.approx(0.7, abs=1e-9)
    assert all(0.01 <= v <= 0.99 for v in al.per_linear.values())


def test_dlp_mean_vs_median_statistic():
    m = tiny_model("llama", layers=4)
    ctx = _ctx(m, torch.randint(0, 128, (4, 32)))
    st = ctx.dense_stats()
    a = allocate_dlp(ctx, 0.5, DLPOptions(stat="median"))
    b = allocate_dlp(ctx, 0.5, DLPOptions(stat="mean"))
    assert a.diagnostics["S"] == [x["median"] for x in st.per_block]
    assert b.diagnostics["S"] == [x["mean"] for x in st.per_block]


def test_alphapruning_on_model():
    m = tiny_model("llama", layers=4)
    ad = ModelAdapter.of(m)
    al = allocate_alphapruning(AllocContext(ad, extra={"device": torch.device("cpu")}), 0.5)
    sizes = ad.linear_sizes()
    assert sum(al.per_linear[k] * sizes[k] for k in sizes) / sum(sizes.values()) == pytest.approx(0.5)


def test_mixed_nm_mean():
    per_block = [0.3, 0.45, 0.5, 0.55, 0.7, 0.5]
    ns = mixed_nm(per_block, [1] * 6, 2, 4)
    assert sum(ns) == 12 and all(0 <= k <= 3 for k in ns)
    assert ns[0] <= ns[-2]


def test_bad_alpha():
    from layerprune.allocation import get_allocator

    with pytest.raises(UserError, match=r"--alpha must be in \(0, 0.5\)"):
        get_allocator("dlp").make_options({"alpha": 0.6})


def test_ratio_cache_keys_on_resolved_options_and_mixed_nm_warning(tmp_path, monkeypatch, tiny_with_tok, caplog):
    from layerprune.api import Session

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path))
    model, tok = tiny_with_tok
    s = Session(model, tok, torch.device("cpu"), nsamples=2, seqlen=32, batch_size=2, progress=False)
    a = s.allocate("dlp", 0.7, {})
    assert "cached" not in a.diagnostics
    b = s.allocate("dlp", 0.7, {"alpha": 0.15})  # the default spelled out: the same entry
    assert "cached" in b.diagnostics and b.per_block == a.per_block
    # a cache hit reports its own (read) time; the computing run's time is kept apart
    assert b.diagnostics["computed_seconds"] == a.diagnostics["seconds"]
    assert b.diagnostics["seconds"] != a.diagnostics["seconds"]
    c = s.allocate("dlp", 0.7, {"alpha": 0.2})
    assert "cached" not in c.diagnostics
    assert len(list((tmp_path / "ratios").glob("dlp-*.json"))) == 2
    # a band narrower than one 2:4 step rounds to uniform 2:4, and says so
    d = s.allocate("dlp", 0.5, {"alpha": 0.01}, nm=(2, 4))
    assert d.nm == [2] * s.adapter.n_blocks
    assert "smaller than one N:M step" in caplog.text


def test_mean_only_statistics_are_the_full_sweeps_means():
    """``what="mean"`` (DLP with the released code's statistic) gives exactly the full sweep's means, per block
    and per linear, and nothing else; its JSON form reads back."""
    import json

    from layerprune.allocation.stats import DenseStats

    m = tiny_model("llama", layers=3)
    ids = torch.randint(0, 128, (4, 32))
    ad = ModelAdapter.of(m)
    full = dense_stats_pass(m, ad, ids, torch.device("cpu"), batch_size=2, progress=False)
    mean = dense_stats_pass(m, ad, ids, torch.device("cpu"), batch_size=2, progress=False, what="mean")
    assert (full.what, mean.what) == ("full", "mean")
    assert [b["mean"] for b in mean.per_block] == [b["mean"] for b in full.per_block]
    assert {n: v["mean"] for n, v in mean.per_linear.items()} == {n: v["mean"] for n, v in full.per_linear.items()}
    assert all(set(b) == {"mean"} for b in mean.per_block + list(mean.per_linear.values()))
    back = DenseStats.from_json(json.loads(json.dumps(mean.to_json())))
    assert (back.per_block, back.per_linear, back.what) == (mean.per_block, mean.per_linear, "mean")


def test_session_sweeps_for_means_only_when_only_means_are_read(tmp_path, monkeypatch, tiny_with_tok):
    """A DLP allocation on the mean statistic runs the mean-only sweep and gives the allocation a full sweep
    gives; OWL afterwards needs the outlier ratios, so the session sweeps again in full. A cached full entry
    serves a later mean request without a sweep."""
    from layerprune.api import Session

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path))
    model, tok = tiny_with_tok
    s = Session(model, tok, torch.device("cpu"), nsamples=2, seqlen=32, batch_size=2, progress=False)
    a = s.allocate("dlp", 0.6, {"stat": "mean"})
    assert s._stats.what == "mean" and "dense_stats_split" in a.diagnostics
    full = Session(model, tok, torch.device("cpu"), nsamples=2, seqlen=32, batch_size=2, progress=False,
                   use_cache=False)
    full.full_stats = True
    b = full.allocate("dlp", 0.6, {"stat": "mean"})
    assert full._stats.what == "full" and b.per_linear == a.per_linear
    o = s.allocate("owl", 0.6, {})
    assert s._stats.what == "full" and "dense_stats_split" in o.diagnostics
    assert len(list((tmp_path / "stats").glob("*.json"))) == 2  # the mean entry and the full one
    later = Session(model, tok, torch.device("cpu"), nsamples=2, seqlen=32, batch_size=2, progress=False)
    assert later.dense_stats("mean").what == "full" and later._stats_cached


@pytest.mark.parametrize("k_at", ["first", "zeros_end", "median", "last"])
def test_radix_select_is_the_exact_kth_value(k_at):
    """The statistics' median (a radix select over the float bit patterns: 12, 12 and 7 bits) equals
    ``kthvalue`` over the concatenation: ties, zeros, a spread over many binades, several parts."""
    from layerprune.allocation.stats import kth_nonneg, score_stats

    g = torch.Generator().manual_seed(0)
    parts = [torch.rand(1000, generator=g) ** 3 * 5, torch.zeros(300), torch.exp(torch.randn(5000, generator=g) * 4),
             torch.full((77,), 0.25), torch.full((5,), -0.0)]
    allv = torch.cat(parts)
    k = {"first": 1, "zeros_end": 300, "median": (allv.numel() + 1) // 2, "last": allv.numel()}[k_at]
    assert kth_nonneg(parts, k) == float(torch.kthvalue(allv, k).values)
    s = score_stats(parts, (3.0,))
    assert s["median"] == float(torch.median(allv)) and s["mean"] == pytest.approx(float(allv.double().mean()))
    assert s["outlier"][3.0] == float((allv > 3.0 * s["mean"]).sum()) / allv.numel()


def test_statistics_over_rank_shares_equal_the_whole():
    """Data-parallel statistics: each rank holds a share of a block's score tensors (one share empty) and
    every histogram, sum and count is summed over the ranks: every rank gets the one-process result."""
    import threading

    from layerprune.allocation.stats import score_stats

    g = torch.Generator().manual_seed(1)
    parts = [torch.rand(700, generator=g) ** 2, torch.exp(torch.randn(3000, generator=g) * 3), torch.zeros(50)]
    whole = score_stats(parts, (3.0, 5.0))
    shares, box, bar, out = [parts[:1], parts[1:], []], [None] * 3, threading.Barrier(3), [None] * 3

    def reduce_for(r):
        def red(t):
            box[r] = t.clone()
            bar.wait()
            total = box[0] + box[1] + box[2]
            bar.wait()
            return t.copy_(total)
        return red

    def run(r):
        out[r] = score_stats(shares[r], (3.0, 5.0), reduce_for(r), numel=sum(t.numel() for t in parts))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for o in out:
        assert o["median"] == whole["median"] and o["outlier"] == whole["outlier"]
        assert o["mean"] == pytest.approx(whole["mean"], rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outlier_counts_from_histogram_and_threshold_bins_are_exact(seed):
    """Outlier ratios come from the first radix digit's histogram plus an exact count inside the bins that
    hold the thresholds: equal to counting ``A > M·mean`` directly, with ties at a threshold included."""
    from layerprune.allocation.stats import OUTLIER_MS, score_stats

    g = torch.Generator().manual_seed(seed)
    a = torch.exp(torch.randn(20000, generator=g) * 2)
    mean = float(a.double().mean())
    b = torch.full((400,), float(torch.tensor(5.0 * mean).float()))  # values on (about) a threshold
    parts = [a, b, torch.zeros(10)]
    allv = torch.cat(parts)
    s = score_stats(parts, OUTLIER_MS)
    for m in OUTLIER_MS:
        assert s["outlier"][m] == float((allv > m * s["mean"]).sum()) / allv.numel()
