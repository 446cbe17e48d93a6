import pytest
import torch
from torch import nn

from conftest import ARCHS, tiny_model
from layerprune.engine.runner import BlockRunner
from layerprune.errors import UserError
from layerprune.models.adapter import ModelAdapter


@pytest.mark.parametrize("arch", ARCHS)
def test_finds_blocks_and_linears(arch):
    m = tiny_model(arch)
    ad = ModelAdapter.of(m)
    assert ad.n_blocks == 3
    names = [ad.full_name(i, n) for i, n, _ in ad.all_linears()]
    assert names and not any("lm_head" in n or "embed" in n for n in names)
    # every nn.Linear of the model except the head is a prunable linear of some block
    all_lin = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and "lm_head" not in n]
    assert sorted(all_lin) == sorted(names)


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_then_blockwise_equals_full_forward(arch):
    """Running the captured inputs through the blocks one by one reproduces the model's hidden states
    (this checks that every keyword argument, e.g. Gemma3's per-layer masks, was captured)."""
    m = tiny_model(arch, layers=4)
    ad = ModelAdapter.of(m)
    ids = torch.randint(0, 128, (5, 24))
    with torch.no_grad():
        ref = m(input_ids=ids, output_hidden_states=True).hidden_states
    r = BlockRunner(m, ad, ids, torch.device("cpu"), batch_size=2)
    for i in range(ad.n_blocks - 1):
        r.run(i, store=True)
        got = torch.cat(r.acts)
        assert torch.allclose(got, ref[i + 1], atol=1e-5), f"block {i} output differs"


def test_not_a_decoder():
    with pytest.raises(UserError):
        ModelAdapter.of(nn.Sequential(nn.Linear(2, 2)))
