"""Warm a fresh process's GPU libraries for the block forwards it is about to run, while it still imports.

A fresh process's first block forward pays one-time costs that the next ones do not: cuBLAS's handles and its
choice of kernel per shape, the loading of each kernel's code on first launch (CUDA's lazy module loading), the
attention kernel's. :func:`warm_up_gpu` runs one matmul per distinct linear shape of a decoder block at the
token count of a calibration batch, and one causal attention call of that batch's shape, so that those costs
are paid beside the imports (the command line starts :func:`start` with the weights' preload, see
``models.preload``). The calls release Python's interpreter lock while they run in PyTorch's C++ code, so the
imports beside them barely wait. Measured in ``bench/probe_cold.py`` (BENCHMARKS.md, session 23).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("layerprune")


def _dims(config: dict) -> tuple[int, int, int, int, int]:
    """(hidden, heads, key/value heads, head size, intermediate) of a LLaMA-family ``config.json``."""
    h, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    return h, heads, kv, int(config.get("head_dim") or h // heads), int(config.get("intermediate_size") or 4 * h)


def block_shapes(config: dict) -> list[tuple[int, int]]:
    """The distinct (out, in) shapes of a LLaMA-family decoder block's linears, from its ``config.json``."""
    h, heads, kv, d, inter = _dims(config)
    return sorted({(heads * d, h), (kv * d, h), (h, heads * d), (inter, h), (h, inter)})


@torch.no_grad()
def warm_up_gpu(config: dict, dtype: torch.dtype, device: torch.device, tokens: int, seqlen: int = 2048) -> None:
    """One ``F.linear`` per :func:`block_shapes` entry with ``tokens`` rows, and one causal
    ``scaled_dot_product_attention`` of ``tokens // seqlen`` sequences of ``seqlen``, on ``device`` in
    ``dtype``. Nothing is kept: on a GPU the memory they used goes back to the driver."""
    _, heads, kv, d, _ = _dims(config)
    for n, k in block_shapes(config):
        F.linear(torch.empty(tokens, k, dtype=dtype, device=device), torch.empty(n, k, dtype=dtype, device=device))
    b = max(1, tokens // seqlen)
    q = torch.zeros(b, heads, seqlen, d, dtype=dtype, device=device)
    kk = torch.zeros(b, kv, seqlen, d, dtype=dtype, device=device)
    F.scaled_dot_product_attention(q, kk, kk, is_causal=True, enable_gqa=kv != heads)
    del q, kk
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # what it held must not count as used when the engine decides what fits


def start(config_path: Path, dtype: torch.dtype, device: torch.device, tokens: int, seqlen: int,
          after: threading.Event | None = None) -> threading.Thread | None:
    """Run :func:`warm_up_gpu` for the model whose ``config.json`` is ``config_path`` on a daemon thread (the
    CUDA context must exist already), once ``after`` is set (the preload's placement: its decision reads the
    GPU's free memory, which the warm-up's buffers must not lower meanwhile), and only when the GPU's free
    memory then holds the whole checkpoint plus the warm-up's buffers plus 2 GiB. Only for a GPU, half precision
    and a LLaMA-family config (one without ``hidden_size`` and ``num_attention_heads`` is skipped); a failure is
    logged at debug level and ignored: the first block then pays these costs itself, as before."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        config = json.loads(Path(config_path).read_text())
        config = config.get("text_config", config) if "hidden_size" not in config else config
        shapes = block_shapes(config)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    need = 2 * max(tokens * k + n * k + tokens * n for n, k in shapes)  # bytes: input, weight, output in half precision
    weights = sum(f.stat().st_size for f in Path(config_path).parent.glob("*.safetensors"))

    def work() -> None:
        if after is not None:
            after.wait()
        try:
            with torch.cuda.device(device):
                free, _ = torch.cuda.mem_get_info(device)
                if free - weights < need + 2**31:  # never crowd the weights the preload is still reading
                    return
                warm_up_gpu(config, dtype, device, tokens, seqlen)
        except Exception as e:  # noqa: BLE001
            log.debug("GPU warm-up skipped (%s)", e)

    t = threading.Thread(target=work, name="layerprune-warm-up", daemon=True)
    t.start()
    return t
