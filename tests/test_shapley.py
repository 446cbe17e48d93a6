import itertools
import json

import numpy as np
import pytest
import torch

from conftest import tiny_model
from layerprune.allocation.common import AllocContext
from layerprune.allocation.shapley import exact_shapley, monte_carlo_shapley, spearman, swsv, swsv_evaluations
from layerprune.allocation.svnup import SVGame, SVNUPOptions, allocate_svnup, svnup_sparsities
from layerprune.errors import UserError
from layerprune.models.adapter import ModelAdapter


def game_table(n, seed=0):
    rng = np.random.default_rng(seed)
    vals = {frozenset(c): rng.normal() for r in range(n + 1) for c in itertools.combinations(range(n), r)}
    return lambda S: vals[frozenset(S)]


def test_efficiency():
    v = game_table(5)
    phi = exact_shapley(5, v)
    assert phi.sum() == pytest.approx(v(frozenset(range(5))) - v(frozenset()))


def test_symmetry_and_dummy():
    # v(S) = 2*[0 in S] + 2*[1 in S] + 0*[2 in S] + |S ∩ {0,1}| == 2 bonus
    def v(S):
        return 2 * (0 in S) + 2 * (1 in S) + 3 * (0 in S and 1 in S)

    phi = exact_shapley(3, v)
    assert phi[0] == pytest.approx(phi[1]) == pytest.approx(3.5)
    assert phi[2] == pytest.approx(0.0)


def test_additivity():
    v1, v2 = game_table(4, 1), game_table(4, 2)
    a = exact_shapley(4, v1) + exact_shapley(4, v2)
    b = exact_shapley(4, lambda S: v1(S) + v2(S))
    assert np.allclose(a, b)


def test_swsv_equals_exact_when_window_is_everything():
    v = game_table(5, 3)
    phi, evals, _ = swsv(5, 5, lambda st, S: v(S), shared_pattern=frozenset(range(5)))
    assert np.allclose(phi, exact_shapley(5, v))
    assert evals == 2**5


@pytest.mark.parametrize("L,w", [(8, 3), (10, 4), (6, 2)])
def test_swsv_evaluation_count(L, w):
    calls = []
    phi, evals, _ = swsv(L, w, lambda st, S: calls.append(1) or float(len(S)), shared_pattern=frozenset(range(w)))
    assert evals == len(calls) == swsv_evaluations(L, w) == (L - w + 1) * (2**w - 1) + 1
    assert np.allclose(phi, 1.0)  # additive game: φ_i = 1 for every window


def test_monte_carlo_converges():
    v = game_table(4, 4)
    assert np.allclose(monte_carlo_shapley(4, v, 3000, 0), exact_shapley(4, v), atol=0.1)


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_budgets_keep_mean():
    phi = np.array([0.5, 0.1, -0.2, 0.05, 0.3])
    for mapping in ("band", "proportional"):
        s = svnup_sparsities(phi, 0.7, 0.08, mapping)
        if mapping == "band":  # the band keeps the unweighted mean; proportional keeps the mean density
            assert s.mean() == pytest.approx(0.7)
        else:
            assert (1 - s).mean() == pytest.approx(0.3)
        assert np.argmin(s) == np.argmax(phi)


def _game(model, **kw):
    ad = ModelAdapter.of(model)
    calib = torch.randint(0, 128, (4, 24))
    sv = torch.randint(0, 128, (3, 24))
    return ad, SVGame(model, ad, sv, calib, 0.6, "wanda", torch.device("cpu"), batch_size=2, progress=False, **kw)


def test_weight_swap_restores_dense_bit_exactly():
    m = tiny_model("llama", layers=4, seed=11)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ad, g = _game(m)
    g.swsv(list(range(4)), 2, progress=False)
    g.close()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("arch,head_tokens", [("llama", None), ("llama", 7), ("llama", 48), ("gemma3", 5)])
def test_game_full_and_dense_payoff_consistent(arch, head_tokens):
    # the head runs in pieces (positions of one row, or whole rows) and must still give the model's own NLL
    m = tiny_model(arch, layers=4, seed=12)
    ad, g = _game(m, head_tokens=head_tokens)
    dense = g.run_from(0, g.runner.hidden(), ["D"] * 4)
    with torch.no_grad():
        ids = g.sv_ids
        logits = m(input_ids=ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert dense == pytest.approx(-float(nll), rel=1e-5)
    pruned = g.run_from(0, g.runner.hidden(), ["P"] * 4)
    assert pruned != dense
    g.close()


@pytest.mark.parametrize("absent,background", [("pruned", "dense"), ("removed", "dense"), ("pruned", "pruned")])
def test_allocate_svnup_counts_and_mean(absent, background):
    m = tiny_model("llama", layers=5, seed=13)
    ad = ModelAdapter.of(m)
    calib = torch.randint(0, 128, (4, 24))
    ctx = AllocContext(ad, calib=lambda: calib,
                       extra={"device": torch.device("cpu"), "pruner": "wanda", "batch_size": 2, "progress": False,
                              "seqlen": 24, "sv_ids": torch.randint(0, 128, (3, 24))})
    al = allocate_svnup(ctx, 0.6, SVNUPOptions(window=3, absent=absent, background=background))
    assert al.diagnostics["evaluations"] == swsv_evaluations(5, 3)
    sizes = ad.block_sizes()
    assert sum(s * n for s, n in zip(al.per_block, sizes)) / sum(sizes) == pytest.approx(0.6)
    assert len(al.diagnostics["phi"]) == 5


def test_svnup_bad_window():
    m = tiny_model("llama", layers=3)
    with pytest.raises(UserError):
        allocate_svnup(AllocContext(ModelAdapter.of(m)), 0.5, SVNUPOptions(window=4))
    with pytest.raises(UserError):
        allocate_svnup(AllocContext(ModelAdapter.of(m)), 0.5, SVNUPOptions(players=[]))


def test_svnup_long_window_needs_yes_before_any_work():
    """w > 10 (or an estimate over an hour) stops with the evaluation count and the way out, before the game."""
    m = tiny_model("llama", layers=12)
    ctx = AllocContext(ModelAdapter.of(m), calib=lambda: pytest.fail("calibration read before the --yes check"),
                       extra={"device": torch.device("cpu")})  # no sv_ids: any work past the check would fail
    with pytest.raises(UserError, match=r"window 11 needs 4095 evaluations .*--yes"):
        allocate_svnup(ctx, 0.5, SVNUPOptions(window=11))
    assert swsv_evaluations(12, 11) == 4095


def test_cli_allocate_and_prune_svnup(tiny_dir, tmp_path, monkeypatch, capsys):
    """`allocate --allocation svnup --json` carries per_block, phi and the evaluation count E(L, w); a second
    call comes from the ratio cache; `prune` records φ, budgets, evaluations and the SV wall time."""
    from layerprune.cli import main

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    args = ["allocate", str(tiny_dir), "--allocation", "svnup", "--sparsity", "0.6", "--window", "2",
            "--sv-samples", "2", "--pruner", "wanda", "--nsamples", "2", "--seqlen", "32", "--device", "cpu",
            "--json", "--quiet"]
    assert main(args) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["evaluations"] == swsv_evaluations(3, 2) == 7 and len(rec["phi"]) == 3 and len(rec["per_block"]) == 3
    assert sum(s * n for s, n in zip(rec["per_block"], rec["block_sizes"])) / sum(rec["block_sizes"]) == \
        pytest.approx(0.6)
    assert "cached" not in rec
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert "cached" in again and again["phi"] == rec["phi"] and again["per_block"] == rec["per_block"]

    assert main(["prune", str(tiny_dir), "--allocation", "svnup", "--sparsity", "0.6", "--window", "2",
                 "--sv-samples", "2", "--pruner", "wanda", "--nsamples", "2", "--seqlen", "32", "--device", "cpu",
                 "--eval", "", "--json", "--quiet", "--no-cache"]) == 0
    run = json.loads(capsys.readouterr().out)
    d = run["allocation"]["diagnostics"]
    assert d["evaluations"] == 7 and len(d["phi"]) == 3 and d["sv_seconds"] > 0
    assert run["per_block"] == pytest.approx(rec["per_block"])

    assert main(["allocate", str(tiny_dir), "--allocation", "svnup", "--window", "4", "--device", "cpu",
                 "--nsamples", "2", "--seqlen", "32"]) == 2
    err = capsys.readouterr().err
    assert "--window 4 must be between 1 and the number of player blocks (3)" in err and "Traceback" not in err


def test_sv_seqlen_sets_the_game_windows(tiny_dir, tmp_path, monkeypatch, capsys):
    """--sv-seqlen plays the game on held-out windows of that length (methods_svnup §1.8: 512 for small local
    models) while the pruner keeps the calibration --seqlen; --sv-samples above 32 is honoured."""
    from layerprune.cli import main

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    common = ["--allocation", "svnup", "--sparsity", "0.6", "--window", "2", "--pruner", "wanda", "--nsamples", "2",
              "--seqlen", "32", "--device", "cpu", "--eval", "", "--json", "--quiet", "--no-cache"]
    assert main(["prune", str(tiny_dir), *common, "--sv-samples", "40", "--sv-seqlen", "8"]) == 0
    d = json.loads(capsys.readouterr().out)["allocation"]["diagnostics"]
    assert (d["sv_samples"], d["sv_seqlen"], d["evaluations"]) == (40, 8, 7)
    assert main(["prune", str(tiny_dir), *common, "--sv-samples", "2"]) == 0
    d = json.loads(capsys.readouterr().out)["allocation"]["diagnostics"]
    assert (d["sv_samples"], d["sv_seqlen"]) == (2, 32)
    assert main(["prune", str(tiny_dir), *common, "--sv-seqlen", "1"]) == 2
    assert "--sv-seqlen" in capsys.readouterr().err


def test_copies_in_host_memory_give_the_same_game():
    """With the dense/pruned copies kept off the accelerator (copied into one buffer per linear on each state
    change) the payoffs, hence φ, are those of the copies-on-device game; the model ends dense."""
    results = []
    for on_device in (True, False):
        m = tiny_model("llama", layers=4, seed=11)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        ad, g = _game(m, copies_on_device=on_device)
        phi, evals = g.swsv(list(range(4)), 2, progress=False)
        g.close()
        results.append(phi)
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k
    assert np.array_equal(results[0], results[1])


@pytest.mark.parametrize("absent,background,players,window", [
    ("pruned", "pruned", [0, 1, 2, 3, 4, 5], 3),    # shared pattern: every player absent
    ("pruned", "dense", [0, 1, 2, 3, 4, 5], 3),     # shared pattern: every player present
    ("removed", "pruned", [0, 1, 2, 3, 4, 5], 2),   # no shared pattern; absent blocks are skipped
    ("pruned", "pruned", [1, 2, 4, 5], 2),          # players with gaps: blocks between them at background
])
def test_window_tree_gives_the_same_payoffs_as_one_coalition_at_a_time(absent, background, players, window):
    """The tree walk over a window's coalitions (play_window) runs each block on the same inputs with the same
    weights as run_from, so every payoff, the evaluation count and φ are identical, bit for bit."""
    m = tiny_model("llama", layers=6, seed=21)
    ad, g = _game(m, absent=absent, background=background)
    tree = g.swsv(players, window, progress=False)
    calls_tree = g.evaluations
    g.window_tree = False
    g.evaluations = 0
    one = g.swsv(players, window, progress=False)
    g.close()
    assert tree[1] == one[1] == swsv_evaluations(len(players), window, 1, shared=(absent == "pruned" or background == "dense"))
    assert calls_tree == g.evaluations
    np.testing.assert_array_equal(tree[0], one[0])
