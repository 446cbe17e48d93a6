"""Data-parallel calibration (torch.distributed, gloo on the CPU): two processes, each with half of the
calibration samples, must produce the model a single process produces from all of them."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny_model
from layerprune.allocation.stats import dense_stats_pass
from layerprune.engine.sequential import prune_sequential
from layerprune.models.adapter import ModelAdapter
from layerprune.pruners import Pattern


def _prune(method: str, ids: torch.Tensor) -> tuple[dict, list]:
    m = tiny_model("llama", layers=3, seed=7)
    ad = ModelAdapter.of(m)
    stats = dense_stats_pass(m, ad, ids, torch.device("cpu"), batch_size=2, progress=False)
    means = dense_stats_pass(m, ad, ids, torch.device("cpu"), batch_size=2, progress=False, what="mean")
    plan = {ad.full_name(i, n): Pattern(0.6) for i in range(3) for n in ad.linear_names[i]}
    res = prune_sequential(m, ad, ids, plan, method, torch.device("cpu"), batch_size=2, progress=False)
    assert res.calib_tokens == ids.numel()  # every rank reports the tokens of the whole set
    blocks = [b["median"] for b in stats.per_block] + [b["outlier"][5.0] for b in stats.per_block]
    linears = [v[key] for v in stats.per_linear.values() for key in ("median", "mean")]
    means_only = [b["mean"] for b in means.per_block] + [v["mean"] for v in means.per_linear.values()]
    return {k: v.clone() for k, v in m.state_dict().items()}, blocks + linears + means_only


def _worker(rank: int, world: int, init: str, method: str, ids: torch.Tensor, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        sd, med = _prune(method, ids)
        torch.save({"sd": sd, "median": med}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_two_ranks_equal_one_process(method, tmp_path):
    ids = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(0))
    ref_sd, ref_med = _prune(method, ids)
    out = str(tmp_path / "r")
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'pg'}", method, ids, out), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    for k in ref_sd:
        assert torch.equal(r0["sd"][k], r1["sd"][k]), f"ranks disagree on {k}"  # broadcast keeps them identical
        assert torch.allclose(r0["sd"][k], ref_sd[k], atol=1e-4, rtol=1e-3), k
        if k.endswith("proj.weight"):
            agree = ((r0["sd"][k] == 0) == (ref_sd[k] == 0)).float().mean().item()
            assert agree > 0.995, f"{k}: masks agree on {agree:.4f}"
    # dense statistics see all samples too; each rank scored a share of the linears, the rows were summed
    assert r0["median"] == r1["median"] and r0["median"] == pytest.approx(ref_med, rel=1e-4)


def _game_phi(pruner: str = "magnitude") -> tuple[list[float], int, list[int] | None]:
    from layerprune.allocation.svnup import SVGame

    m = tiny_model("llama", layers=5, seed=3)
    ad = ModelAdapter.of(m)
    sv = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    calib = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(2))
    g = SVGame(m, ad, sv, calib if pruner != "magnitude" else None, 0.6, pruner, torch.device("cpu"), batch_size=2,
               progress=False)
    phi, evals = g.swsv(list(range(5)), 2, progress=False)
    per_rank = getattr(g, "evaluations_per_rank", None)
    g.close()
    return phi.tolist(), evals, per_rank


def _game_worker(rank: int, world: int, init: str, out: str, pruner: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.save(_game_phi(pruner), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("pruner", ["magnitude", "sparsegpt"])
def test_svnup_game_split_over_two_ranks_gives_the_same_phi(tmp_path, pruner):
    """The windows are dealt to the ranks; the gathered payoff table gives every rank the one-process φ, bit for
    bit, also with a base pruner that reads calibration data: each rank makes the pruned copies by itself from
    every sample (data-parallel Hessians, summed in another order, would flip mask decisions)."""
    torch.set_num_threads(1)
    ref_phi, ref_evals, _ = _game_phi(pruner)
    out = str(tmp_path / "g")
    mp.spawn(_game_worker, args=(2, f"file://{tmp_path / 'pg'}", out, pruner), nprocs=2, join=True)
    for r in (0, 1):
        phi, evals, per_rank = torch.load(f"{out}.{r}")
        assert evals == ref_evals and phi == ref_phi
        assert sum(per_rank) == ref_evals and min(per_rank) > 0  # each rank played its share, nothing twice


def test_deal_balances_costs_deterministically():
    from layerprune.distributed import deal

    # LLaMA-7B block on two ranks: q/k/v, o, gate/up, down (OBS cost in³ + rows·in²)
    k, f = 4096.0, 11008.0
    costs = [k**3 + 3 * k * k**2, k**3 + k * k**2, k**3 + 2 * f * k**2, f**3 + k * f**2]
    owners = deal(costs, 2)
    assert owners == deal(costs, 2) == [1, 1, 1, 0]  # down (68% of the cost) alone, the rest on the other rank
    owners = deal([5.0, 4.0, 3.0, 3.0, 1.0], 2)
    assert [sum(c for c, o in zip([5, 4, 3, 3, 1], owners) if o == r) for r in (0, 1)] == [8, 8]
    assert deal([1.0, 1.0, 1.0], 1) == [0, 0, 0] and deal([], 3) == []


def _hang_worker(rank: int, world: int, init: str, out: str) -> None:
    import datetime
    import time

    from layerprune.distributed import all_reduce_sum, explain_failure

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=3))
    try:
        if rank == 1:
            time.sleep(8)  # never joins the collective: rank 0 must not wait for ever
            return
        t0 = time.monotonic()
        try:
            all_reduce_sum(torch.ones(4))
            msg = None
        except Exception as e:  # noqa: BLE001
            msg = explain_failure(e)
        with open(out, "w") as f:
            f.write(f"{time.monotonic() - t0:.1f}\n{msg}")
    finally:
        dist.destroy_process_group()


def test_a_stuck_rank_gives_a_timeout_and_one_clear_line(tmp_path):
    """A rank that never joins a collective: the others fail after the process group's timeout with a one-line
    account (what the CLI prints instead of a traceback), not a silent hang."""
    out = str(tmp_path / "hang.txt")
    mp.spawn(_hang_worker, args=(2, f"file://{tmp_path / 'pg'}", out), nprocs=2, join=True)
    waited, msg = open(out).read().split("\n", 1)
    assert float(waited) < 8, "rank 0 waited for the stuck rank instead of timing out"
    assert msg.startswith("rank 0 of 2: a collective with the other ranks failed") and "LAYERPRUNE_DIST_TIMEOUT" in msg
