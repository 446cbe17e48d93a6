import pytest
import torch
from torch import nn

from layerprune.pruners import PRUNERS, Pattern
from layerprune.pruners.magnitude import MagnitudePruner
from layerprune.pruners.sparsegpt import SparseGPTPruner
from layerprune.pruners.wanda import WandaPruner


def correlated_inputs(n=2048, d=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 16, generator=g)
    mix = torch.randn(16, d, generator=g)
    scale = torch.exp(torch.randn(d, generator=g))  # uneven feature norms (Wanda's premise)
    return (base @ mix + 0.3 * torch.randn(n, d, generator=g)) * scale


def make_layer(d_in=256, d_out=64, seed=1):
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=False)
    return lin


def recon_error(method, pattern, X, seed=1):
    lin = make_layer(X.shape[1], seed=seed)
    W0 = lin.weight.data.clone()
    p = PRUNERS[method].make(lin)
    for chunk in X.split(256):
        p.add_batch(chunk.unsqueeze(0))
    p.prune(pattern)
    return float(torch.linalg.norm(X @ W0.t() - X @ lin.weight.data.t())), lin


@pytest.mark.parametrize("pattern", [Pattern(0.5), Pattern(0.7), Pattern(0.5, 2, 4)])
def test_sparsegpt_beats_wanda_beats_magnitude(pattern):
    X = correlated_inputs()
    e_sgpt, _ = recon_error("sparsegpt", pattern, X)
    e_wanda, _ = recon_error("wanda", pattern, X)
    e_mag, _ = recon_error("magnitude", pattern, X)
    assert e_sgpt < e_wanda < e_mag


def test_sparsegpt_exact_per_column_block():
    X = correlated_inputs(d=300)
    _, lin = recon_error("sparsegpt", Pattern(0.6), X)
    W = lin.weight.data
    for i1 in range(0, 300, 128):
        blk = W[:, i1:i1 + 128]
        assert int((blk == 0).sum()) == int(blk.numel() * 0.6)


def test_wanda_exact_per_row_and_matches_reference_score():
    X = correlated_inputs()
    lin = make_layer()
    W0 = lin.weight.data.clone()
    p = WandaPruner(lin)
    for chunk in X.split(512):
        p.add_batch(chunk.unsqueeze(0))
    # reference: |W| * sqrt(sum x^2 / Nseq)
    ref = W0.abs() * torch.sqrt((X**2).sum(0) / 4).unsqueeze(0)
    assert torch.allclose(p.score(), ref, rtol=1e-4)
    p.prune(Pattern(0.5))
    assert ((lin.weight.data == 0).sum(1) == 128).all()


def test_magnitude_exact_per_matrix():
    lin = make_layer()
    MagnitudePruner(lin).prune(Pattern(0.7))
    assert int((lin.weight.data == 0).sum()) == int(lin.weight.numel() * 0.7)


@pytest.mark.parametrize("method", list(PRUNERS))
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_for_every_pruner(method, n, m):
    X = correlated_inputs(n=512)
    _, lin = recon_error(method, Pattern(n / m, n, m), X)
    W = lin.weight.data
    assert ((W.view(W.shape[0], -1, m) == 0).sum(-1) >= n).all()


def test_sparsegpt_retries_cholesky(caplog):
    lin = make_layer(2, 2)
    p = SparseGPTPruner(lin)
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # indefinite: Cholesky fails until damping dominates
    hinv = p._hinv(H)
    assert torch.isfinite(hinv).all()
    assert "retrying" in caplog.text


def _hinv(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(400, count, generator=g) @ torch.randn(count, count, generator=g) * 0.3
    H = X.T @ X / 400 + 0.01 * torch.eye(count)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


@pytest.mark.parametrize("rows,count,n,m", [(21, 64, 0, 0), (9, 50, 0, 0), (21, 64, 2, 4), (10, 40, 4, 8),
                                            (7, 30, 2, 4)])
def test_fused_obs_kernel_equals_reference_loop(interpret, rows, count, n, m):
    """The Triton OBS block kernel gives the reference loop's pruned weights, errors and (N:M) masks:
    ragged row tiles, a block narrower than the tile, and N:M groups cut by the block's end."""
    from layerprune.pruners.obs import obs_block, obs_block_torch

    Hinv = _hinv(count)
    W = torch.randn(rows, count, generator=torch.Generator().manual_seed(1))
    mask = (torch.rand(rows, count, generator=torch.Generator().manual_seed(2)) < 0.6) if m == 0 else \
        torch.zeros(rows, count, dtype=torch.bool)
    m_ref, m_k = mask.clone(), mask.clone()
    Q_ref, E_ref = obs_block_torch(W.clone(), Hinv, m_ref, n, m)
    Q_k, E_k = obs_block(W.clone(), Hinv, m_k, n, m, fused=True)
    assert torch.equal(m_ref, m_k)
    assert torch.allclose(Q_ref, Q_k, rtol=1e-5, atol=1e-6) and torch.allclose(E_ref, E_k, rtol=1e-5, atol=1e-6)
    assert torch.equal(Q_k == 0, m_k | (W == 0))  # exactly the masked weights are zero
    if m and count % m == 0:
        assert torch.equal(m_k.view(rows, -1, m).sum(-1), torch.full((rows, count // m), n))


def _sgpt_solves(pattern: Pattern, **variants) -> list[torch.Tensor]:
    """The pruned weights of one 160-input layer (two column blocks, one ragged) under each options variant."""
    from layerprune.pruners.sparsegpt import SparseGPTOptions

    X = correlated_inputs(n=512, d=160)
    outs = []
    for opts in variants.values():
        lin = make_layer(160, 12)
        p = SparseGPTPruner(lin, SparseGPTOptions(**opts))
        p.add_batch(X.unsqueeze(0))
        p.prune(pattern)
        outs.append(lin.weight.data.clone())
    return outs


@pytest.mark.parametrize("pattern", [Pattern(0.6), Pattern(0.5, 2, 4)])
def test_sparsegpt_fused_solve_equals_loop(interpret, pattern):
    """A whole SparseGPT solve with the fused kernel equals the loop's."""
    fused, loop = _sgpt_solves(pattern, fused={"fused": True}, loop={"fused": False})
    assert torch.equal(fused == 0, loop == 0)
    assert torch.allclose(fused, loop, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("count", [7, 64, 150])
def test_direct_hinv_factor_equals_the_reference_three_step_factor(count):
    """U = J L⁻¹ J from one Cholesky of the flipped H is the upper Cholesky factor of H⁻¹: the reference's
    Cholesky → cholesky_inverse → Cholesky gives the same matrix up to fp32 rounding, and Uᵀ U = H⁻¹."""
    from layerprune.pruners.sparsegpt import SparseGPTOptions

    g = torch.Generator().manual_seed(count)
    X = torch.randn(3 * count, count, generator=g) @ torch.randn(count, count, generator=g)
    H = X.T @ X / (3 * count)
    lin = make_layer(count, 3)
    direct = SparseGPTPruner(lin, SparseGPTOptions(hinv_direct=True))._hinv(H)
    ref = SparseGPTPruner(lin, SparseGPTOptions(hinv_direct=False))._hinv(H)
    assert torch.equal(direct, direct.triu()) and bool((direct.diagonal() > 0).all())
    assert float((direct - ref).abs().max() / ref.abs().max()) < 1e-4
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(count)
    assert torch.allclose((direct.T @ direct).double(), torch.linalg.inv(Hd.double()), rtol=1e-3, atol=1e-5)


def test_sparsegpt_direct_hinv_prunes_as_the_reference():
    """A whole solve with the direct factor picks the same mask and (to fp32 rounding) the same weights."""
    direct, ref = _sgpt_solves(Pattern(0.6), direct={"hinv_direct": True}, ref={"hinv_direct": False})
    assert torch.equal(direct == 0, ref == 0)
    assert torch.allclose(direct, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("d,rows", [(37, 8), (64, 64), (50, 1024)])
def test_gram_upper_blocks_mirror_to_the_full_hessian(d, rows):
    """The Hessian accumulated by row blocks on and above the diagonal (the tensor-core path), mirrored by
    ``hessian()``, is H = Σ x xᵀ: ragged last blocks, one block, a block wider than H."""
    from layerprune.pruners.sparsegpt import gram_upper_

    g = torch.Generator().manual_seed(d)
    x = torch.randn(300, d, generator=g)
    H = torch.zeros(d, d)
    gram_upper_(H, x, 0.5, rows)
    gram_upper_(H, x[:100], 2.0, rows)
    full = 0.5 * x.T @ x + 2.0 * x[:100].T @ x[:100]
    below = torch.arange(d)[None, :] < (torch.arange(d)[:, None] // rows * rows)
    assert bool((H[below] == 0).all()) and bool((H[~below] != 0).all())  # only blocks on/above the diagonal
    lin = make_layer(d, 3)
    p = SparseGPTPruner(lin)
    p.H, p.upper = H, True
    assert torch.allclose(p.hessian(), full, rtol=1e-5, atol=1e-4)
    assert torch.equal(p.H, H)  # the accumulated blocks stay as they are (a Hessian may be shared)
