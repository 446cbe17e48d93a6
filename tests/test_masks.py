import pytest
import torch

from layerprune.errors import UserError
from layerprune.pruners.masks import matrix_mask, nm_mask, parse_nm, row_mask


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.77])
def test_row_mask_exact_per_row(s):
    score = torch.rand(17, 93)
    mask = row_mask(score, s)
    assert (mask.sum(1) == int(93 * s)).all()
    # the pruned entries are the smallest of each row
    kept_min = torch.where(mask, torch.inf, score).min(1).values
    pruned_max = torch.where(mask, score, -torch.inf).max(1).values
    assert (pruned_max <= kept_min).all() or s == 0.0


def test_matrix_mask_exact_and_ties_by_index():
    score = torch.ones(4, 8)  # all tied
    mask = matrix_mask(score, 0.5)
    assert int(mask.sum()) == 16
    assert mask.flatten()[:16].all()  # ties broken by index


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_per_group(n, m):
    score = torch.rand(6, 32)
    mask = nm_mask(score, n, m)
    assert (mask.view(6, -1, m).sum(-1) == n).all()


@pytest.mark.parametrize("bad", ["2-4", "4:2", "0:4", "a:b", "4:4"])
def test_parse_nm_rejects(bad):
    with pytest.raises(UserError):
        parse_nm(bad)


def test_nm_width():
    with pytest.raises(UserError):
        nm_mask(torch.rand(2, 6), 2, 4)
