"""Perplexity with the reference protocol (methods_dlp.md §5.1).

The text is joined once (WikiText-2 with ``"\\n\\n"``, C4/PTB with ``" "``), tokenised once,
cut into ``floor(T / seqlen)`` non-overlapping windows (remainder dropped, no per-window BOS);
each window contributes ``mean CE(logits[:-1], tokens[1:]) * seqlen`` and
``PPL = exp(sum nll_i / (n * seqlen))``. C4 is truncated to 256 windows as in the reference.
Windows are batched; the result does not depend on the batch size.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from layerprune.data import prefetch
from layerprune.data.calibration import token_windows
from layerprune.data.sources import load_text
from layerprune.errors import UserError
from layerprune.utils import model_device

log = logging.getLogger("layerprune")

# evaluation windows per tokenizer object: a grid evaluates the same texts after every cell (tokenising
# WikiText-2 and C4 takes ~5 s of CPU each time); the entry goes with the tokenizer
_WINDOWS: "weakref.WeakKeyDictionary[object, dict[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()


def eval_windows(tokenizer, dataset: str, seqlen: int, max_windows: int | None, split: str | None = None,
                 data_dir: str | None = None, flag: str = "--seqlen") -> torch.Tensor:
    """The evaluation windows of ``dataset`` (read and tokenised once per tokenizer object and settings)."""
    if dataset == "c4":
        max_windows = 256 if max_windows is None else min(max_windows, 256)
    key = (dataset, split, str(data_dir), seqlen, max_windows)
    prefetch.settle(tokenizer)  # the windows may be on their way from prune's background tokenising
    try:
        cache = _WINDOWS.setdefault(tokenizer, {})
    except TypeError:  # an object that takes no weak reference: no cache
        cache = {}
    if key not in cache:
        cache[key] = token_windows(tokenizer, load_text(dataset, split, data_dir), seqlen, max_windows, flag)
    return cache[key]


def context_length(model: nn.Module | Any) -> int | None:
    """``max_position_embeddings`` of a model or of its config (a multimodal config's text part), or None."""
    cfg = getattr(model, "config", model)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return getattr(cfg, "max_position_embeddings", None)


def check_seqlen(model: nn.Module, seqlen: int, flag: str = "--seqlen") -> None:
    """``seqlen`` must fit the model's context; ``flag`` names the option that set it."""
    ctx = context_length(model)
    if seqlen < 2:
        raise UserError(f"{flag} must be at least 2 (got {seqlen})")
    if ctx is not None and seqlen > ctx:
        raise UserError(f"{flag} {seqlen} is beyond the model's context of {ctx} tokens: use {flag} {ctx} or less")


@torch.no_grad()
def perplexity_of_windows(model: nn.Module, windows: torch.Tensor, batch_size: int = 1,
                          desc: str = "ppl", device: torch.device | str | None = None, progress: bool = False) -> float:
    """Reference PPL over ``windows`` (n, seqlen). The model may sit on CPU with blocks offloaded."""
    dev = torch.device(device) if device is not None else model_device(model)
    n, seqlen = windows.shape
    total = 0.0
    for s in tqdm(range(0, n, batch_size), desc=desc, leave=False, disable=not progress):
        batch = windows[s : s + batch_size].to(dev)
        logits = model(input_ids=batch, use_cache=False).logits
        shift = logits[:, :-1, :].float()
        ce = nn.functional.cross_entropy(shift.reshape(-1, shift.size(-1)), batch[:, 1:].reshape(-1), reduction="none")
        total += float(ce.view(batch.shape[0], -1).mean(dim=1).sum()) * seqlen
        del logits, shift, ce
    return math.exp(total / (n * seqlen))


def perplexity_blockwise(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 1) -> float:
    """The same perplexity with the model run one block at a time on ``device`` through the engine (every
    window through block i, then block i + 1), for a model that does not fit there: each block is copied in,
    run on all windows and copied back; the head runs last, in pieces. Total NLL / predicted tokens equals
    the reference's mean of per-window means (every window predicts seqlen − 1 tokens)."""
    from layerprune.engine.sequential import sweep_nll
    from layerprune.models.adapter import ModelAdapter

    tot, cnt = sweep_nll(model, ModelAdapter.of(model), windows, device, lambda i, b: None,
                         lambda i, b: b.to("cpu"), batch_size)
    return math.exp(tot / cnt)


def fits_for_eval(model: nn.Module, device: torch.device, batch_size: int, seqlen: int) -> bool:
    """Whether the whole model can go to ``device`` for evaluation: the bytes not yet there plus a batch's
    fp32 logits (twice) and 1 GiB of activations under 90% of the free memory; always on a CPU."""
    if device.type != "cuda":
        return True
    from layerprune.engine.sequential import model_bytes_off

    free, _ = torch.cuda.mem_get_info(device)
    vocab = getattr(getattr(model, "config", None), "vocab_size", 0) or 0
    need = model_bytes_off(model, device) + 8 * batch_size * seqlen * vocab + 2**30
    return need < 0.9 * free


def _blockwise_ok(model: nn.Module) -> bool:
    from layerprune.models.adapter import ModelAdapter

    try:
        ModelAdapter.of(model)
    except Exception:  # noqa: BLE001 - e.g. a PEFT wrapper: evaluated whole, as before
        return False
    return True


def perplexity(model: nn.Module, tokenizer, dataset: str = "wikitext2", seqlen: int = 2048,
               max_windows: int | None = None, batch_size: int = 1, split: str | None = None,
               data_dir: str | None = None, progress: bool = False, flag: str = "--seqlen",
               blockwise_on: torch.device | None = None) -> dict:
    """Return ``{"ppl", "windows", "tokens", "seqlen", "dataset"}`` for one dataset (``blockwise_on``: run
    the model one block at a time on that device, :func:`perplexity_blockwise`)."""
    check_seqlen(model, seqlen, flag)
    win = eval_windows(tokenizer, dataset, seqlen, max_windows, split, data_dir, flag)
    out = {"dataset": dataset, "windows": int(win.shape[0]), "tokens": int(win.numel()), "seqlen": seqlen}
    if blockwise_on is not None:
        out.update(ppl=perplexity_blockwise(model, win, blockwise_on, batch_size), blockwise=True)
    else:
        out["ppl"] = perplexity_of_windows(model, win, batch_size, desc=f"ppl {dataset}", progress=progress)
    return out


def evaluate_ppl(model: nn.Module, tokenizer, datasets: list[str], seqlen: int, max_windows: int | None,
                 device: torch.device, batch_size: int = 1, data_dir: str | None = None, progress: bool = False,
                 flag: str = "--eval-seqlen", blockwise: bool | None = None) -> dict[str, dict]:
    """Perplexity on each dataset; ``{name: perplexity record + seconds}``. The model moves to ``device``
    when it fits there (:func:`fits_for_eval`); otherwise (or with ``blockwise=True``) it runs one block at a
    time through the engine and stays in host memory."""
    device = torch.device(device)
    if blockwise is None:
        blockwise = not fits_for_eval(model, device, batch_size, seqlen) and _blockwise_ok(model)
        if blockwise:
            log.info("the model does not fit on %s for evaluation: perplexity runs one block at a time", device)
    if not blockwise:
        model.to(device)
    out = {}
    for d in datasets:
        t = time.perf_counter()
        r = perplexity(model, tokenizer, d, seqlen, max_windows, batch_size, data_dir=data_dir, progress=progress,
                       flag=flag, blockwise_on=device if blockwise else None)
        r["seconds"] = time.perf_counter() - t
        out[d] = r
        log.info("ppl %s (seqlen %d, %d windows): %.3f", d, seqlen, r["windows"], r["ppl"])
    return out
