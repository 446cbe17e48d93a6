"""The fused RMSNorm and rotary kernels of the engine's forwards (layerprune/engine/fused*.py): equal to
transformers' code, checked on first use, dropped when they disagree, restored on leaving the context.
On the CPU they run under Triton's interpreter; on a GPU machine the same tests run the compiled kernels."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.conftest import tiny_model


@pytest.fixture
def kdev(request):
    """Where the kernels run: the GPU if there is one, else the CPU under Triton's interpreter (conftest's
    ``interpret`` fixture, which skips where the interpreter was not switched on). Skipped only where the triton
    package is not installed; the tests without this fixture need no Triton."""
    pytest.importorskip("triton", reason="the fused kernels need the triton package, which this machine lacks")
    from layerprune.engine import fused

    fused._TRUST.clear()
    if torch.cuda.is_available():
        yield torch.device("cuda")
    else:
        request.getfixturevalue("interpret")
        yield torch.device("cpu")
    fused._TRUST.clear()


def _dtypes(dev):
    return [torch.bfloat16, torch.float16] if dev.type == "cuda" else [torch.bfloat16]


@pytest.mark.parametrize("b,h,hk,length,d,cos_b", [(2, 4, 2, 7, 16, 1), (2, 3, 3, 5, 12, 2), (1, 8, 1, 9, 64, 1)])
def test_rope_kernel_is_bit_identical_to_transformers(kdev, b, h, hk, length, d, cos_b):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from layerprune.engine.fused_triton import rope

    g = torch.Generator().manual_seed(0)
    for dt in (torch.bfloat16, torch.float16):
        # the layout attention gives them: [B, L, H, D] viewed as [B, H, L, D]
        q = torch.randn(b, length, h, d, generator=g).to(dt).to(kdev).transpose(1, 2)
        k = torch.randn(b, length, hk, d, generator=g).to(dt).to(kdev).transpose(1, 2)
        cos = torch.randn(cos_b, length, d, generator=g).to(dt).to(kdev)
        sin = torch.randn(cos_b, length, d, generator=g).to(dt).to(kdev)
        want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
        got_q, got_k = rope(q, cos, sin), rope(k, cos, sin)
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
        assert got_q.stride() == q.stride()  # same layout as the input, as PyTorch's elementwise ops give


@pytest.mark.parametrize("n", [64, 48])
def test_rms_norm_kernel_is_llama_rms_norm_within_one_ulp(kdev, n):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from layerprune.engine.fused import _close
    from layerprune.engine.fused_triton import rms_norm

    g = torch.Generator().manual_seed(1)
    for dt in _dtypes(kdev):
        norm = LlamaRMSNorm(n, eps=1e-5).to(kdev, dt)
        norm.weight.data = torch.randn(n, generator=g).to(dt).to(kdev)
        x = (3 * torch.randn(3, 5, n, generator=g)).to(dt).to(kdev)
        with torch.no_grad():
            want = norm(x)
        got = rms_norm(x, norm.weight, norm.variance_epsilon)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert _close(got, want)
        assert (got == want).float().mean() > 0.99  # only the fp32 sum's order differs


@pytest.mark.parametrize("arch,dt", [("llama", torch.bfloat16), ("qwen2", torch.bfloat16),
                                     ("mistral", torch.bfloat16), ("llama", torch.float16)])
def test_fused_forward_matches_and_everything_is_restored(kdev, arch, dt):
    from layerprune.engine import fused

    m = tiny_model(arch, layers=2).to(kdev, dt)
    mod = __import__(type(m.model.layers[0].self_attn).__module__, fromlist=["x"])
    rope_before = mod.apply_rotary_pos_emb
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0)).to(kdev)
    with torch.no_grad():
        plain = m(ids).logits
        with fused.fused_ops(m, kdev) as done:
            assert done == {"norms": 2 * 2 + 1, "rotary": [mod.__name__]}
            assert mod.apply_rotary_pos_emb is not rope_before
            got = m(ids).logits
        # the first calls checked both kernels against the model's code on these inputs, and both passed
        assert sorted(k[0] for k, v in fused._TRUST.items() if v) == ["norm", "rope"]
        assert not any(v is False for v in fused._TRUST.values())
        assert torch.allclose(got.float(), plain.float(), rtol=2e-2, atol=2e-2)
        assert mod.apply_rotary_pos_emb is rope_before
        assert not any("forward" in x.__dict__ for x in m.modules())
        assert torch.equal(m(ids).logits, plain)


def test_other_norm_forms_are_left_alone(kdev):
    """Gemma3's RMSNorm scales by (1 + weight) and OPT has LayerNorm: neither is replaced."""
    from layerprune.engine import fused

    for arch in ("gemma3", "opt"):
        m = tiny_model(arch, layers=2).to(kdev, torch.bfloat16)
        with fused.fused_ops(m, kdev) as done:
            assert done["norms"] == 0


def test_a_disagreeing_kernel_is_dropped_and_the_model_code_runs(kdev, monkeypatch, caplog):
    from layerprune.engine import fused, fused_triton

    m = tiny_model("llama", layers=2).to(kdev, torch.bfloat16)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0)).to(kdev)
    real = fused_triton.rope
    monkeypatch.setattr(fused_triton, "rope", lambda x, c, s: real(x, c, s) + 1)
    with torch.no_grad():
        with fused.fused_ops(m, kdev, enabled=False) as done:
            assert done == {}
            plain = m(ids).logits
        with caplog.at_level(logging.WARNING), fused.fused_ops(m, kdev):
            first = m(ids).logits
            again = m(ids).logits
    assert [v for k, v in fused._TRUST.items() if k[0] == "rope"] == [False]
    assert "rotary embedding differs" in caplog.text
    assert torch.allclose(first.float(), plain.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(first, again)


def _boom(*a, **k):
    raise AssertionError("kernel called")


def test_gradients_take_the_model_code(kdev, monkeypatch):
    """The kernels have no backward: inputs that need gradients go to the model's own code."""
    from layerprune.engine import fused, fused_triton

    monkeypatch.setattr(fused_triton, "rms_norm", _boom)
    monkeypatch.setattr(fused_triton, "rope", _boom)
    m = tiny_model("llama", layers=1).to(kdev, torch.bfloat16)
    ids = torch.randint(0, 128, (1, 8)).to(kdev)
    with fused.fused_ops(m, kdev) as done:
        assert done["norms"] == 3
        m(ids).logits.float().sum().backward()
    assert m.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_fp32_rotary_takes_the_model_code(kdev, monkeypatch):
    from layerprune.engine import fused, fused_triton

    monkeypatch.setattr(fused_triton, "rope", _boom)
    for dt in (torch.float32,):
        m = tiny_model("llama", layers=1).to(kdev, dt)
        with torch.no_grad(), fused.fused_ops(m, kdev) as done:
            assert done["rotary"]
            m(torch.randint(0, 128, (1, 8)).to(kdev))


def test_disabled_by_flag_or_off_device():
    from layerprune.cli import parse
    from layerprune.engine import fused

    m = tiny_model("llama", layers=1)
    with fused.fused_ops(m, "cpu") as done:  # a CPU tensor without the interpreter switch: nothing replaced
        assert done == {}
    for cmd in ("prune", "allocate", "eval"):
        assert parse([cmd, "x", "--no-fused-kernels"]).no_fused_kernels is True
