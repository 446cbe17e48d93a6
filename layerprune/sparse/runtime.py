"""Generation with a model spec or a sparse directory (``layerprune generate``).

Driven step by step from Python, as Hugging Face's ``generate`` drives it, a 7B model's decode is bound by the host,
which hides what the sparse kernels save and charges each sparse linear's launch to every token. On a GPU the greedy
decode therefore runs by default with a static KV cache and its one-token step captured once as a CUDA graph and
replayed (:func:`greedy_static`, the step of ``bench-decode``; ``generate --no-graphs`` turns it off). Its one
warm-up step before the capture is the generation's own first step. LLaMA-2-7B dims at 70%, batch 1, H200, 64 new
tokens, the whole call: dense 157 → sparse 209 tokens/s (1.33×), against 38 → 42 through ``model.generate`` in the
same run (BENCHMARKS.md, session 31). The replayed steps give the tokens of the same loop's eager steps (GPU test),
and those equal ``model.generate``'s (CPU test). When the model's generation config asks for logits processors that
greedy ``argmax`` would skip, or the static cache cannot be built, ``model.generate`` runs.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from layerprune.errors import UserError

log = logging.getLogger("layerprune")
MIN_REPLAYS = 2  # fewer steps left after the warm-up: eager steps (a capture costs about one eager step)

# Generation-config fields whose non-neutral values change greedy tokens (Hugging Face's logits processors): the
# static path only takes the argmax, so a model that sets any of them generates through ``model.generate``.
_NEUTRAL = {"repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
            "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
            "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
            "forced_eos_token_id": (None,), "sequence_bias": (None,), "min_length": (None, 0),
            "min_new_tokens": (None, 0), "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0),
            "renormalize_logits": (None, False), "watermarking_config": (None,)}


def plain_argmax(model: nn.Module) -> str | None:
    """None when greedy decoding of ``model`` is the argmax of its logits; else the generation-config field that
    says otherwise."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return None
    for name, neutral in _NEUTRAL.items():
        if getattr(gc, name, None) not in neutral:
            return name
    return None


def _eos_ids(model: nn.Module) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


@torch.no_grad()
def greedy_static(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, graphs: bool = True) -> tuple[torch.Tensor, str]:
    """``(new tokens, mode)``: greedy continuation of ``ids`` (1 × L) by argmax, with a ``transformers.StaticCache``
    of L + ``max_new_tokens`` positions; the decode step replayed from a CUDA graph on a GPU when ``graphs`` and at
    least ``MIN_REPLAYS`` replays would follow the warm-up step (:func:`layerprune.sparse.bench.step_runner`, whose
    warm-up before the capture is the first real decode step here; ``mode`` says how it ran). Stops after the first
    end-of-sequence token of the generation config, which is kept, as ``model.generate`` does; the host looks for it
    every 16 steps, so a graph runs ahead of it at most that far (the extra tokens are dropped)."""
    from transformers import StaticCache

    from layerprune.sparse.bench import REAL_WARMUP, cache_kwarg, step_runner

    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError("greedy_static takes one sequence (1 × L token ids)")
    dev = ids.device
    n = ids.shape[1]
    cache = StaticCache(config=model.config, max_batch_size=1, max_cache_len=n + max_new_tokens)
    out = model(input_ids=ids, **{cache_kwarg(model): cache}, cache_position=torch.arange(n, device=dev), use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    pos = torch.tensor([n], device=dev)
    new = torch.empty(1, max_new_tokens, dtype=torch.long, device=dev)
    new[:, :1] = tok
    eos = _eos_ids(model)
    eos_t = torch.tensor(sorted(eos), device=dev) if eos else None
    done, mode = 1, "eager"

    def advance(nxt: torch.Tensor) -> None:  # one decode step taken: its token kept, the next step's input set
        nonlocal done
        new[:, done:done + 1] = nxt
        tok.copy_(nxt)
        pos.add_(1)
        done += 1

    if max_new_tokens > 1:
        # a capture pays off only with a few steps left after the warm-up step (a real step here)
        run, mode = step_runner(model, cache, tok, pos, graphs and max_new_tokens - 1 - REAL_WARMUP >= MIN_REPLAYS,
                                length=n + max_new_tokens, advance=advance)
        while done < max_new_tokens:
            if eos_t is not None and done % 16 == 1 and bool(torch.isin(new[0, :done], eos_t).any()):
                break
            advance(run())
    toks = new[0, :done].tolist()
    end = next((i for i, t in enumerate(toks) if t in eos), None)
    return torch.tensor(toks[:end + 1] if end is not None else toks, dtype=torch.long), mode


def generate(model: str, prompt: str, max_new_tokens: int = 32, device: str = "auto", dtype: str = "auto",
             trust_remote_code: bool = False, merge: bool = True, graphs: bool = True) -> dict:
    """Greedy continuation of ``prompt``; a sparse directory runs its ``SparseLinear`` layers, with the linears
    that read one input stacked (``merge``, :mod:`layerprune.sparse.merge`). ``dtype`` "auto": bfloat16 on a GPU,
    float32 on the CPU. On CUDA with ``graphs``:
    :func:`greedy_static` (static KV cache, the decode step replayed from a CUDA graph), unless the generation config
    asks for logits processors; else (or if the static cache cannot be built for the model: one warning)
    ``model.generate``."""
    from layerprune.engine.fused import fused_ops
    from layerprune.models.loading import check_model_spec, load_model, parse_dtype
    from layerprune.sparse.linear import SparseLinear
    from layerprune.sparse.merge import merge_siblings
    from layerprune.utils import resolve_device

    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    check_model_spec(model)
    dev = resolve_device(device)
    if dtype == "auto":  # the sparse CUDA kernels are bf16 kernels; a float32 model on a GPU would unpack every call
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    m, tok = load_model(model, dtype=parse_dtype(dtype), device=dev, trust_remote_code=trust_remote_code)
    n_sparse = sum(isinstance(x, SparseLinear) for x in m.modules())
    merged = merge_siblings(m) if merge and n_sparse else []
    ids = tok(prompt, return_tensors="pt").input_ids.to(dev)
    why = plain_argmax(m)
    static = graphs and dev.type == "cuda" and why is None
    if graphs and dev.type == "cuda" and why is not None:
        log.warning("generate: the model's generation config sets %s; generating with transformers' generate "
                    "(eager steps) to honour it", why)
    t = time.perf_counter()
    new, mode = None, "transformers generate (eager)"
    with torch.no_grad(), fused_ops(m, dev):
        if static:
            try:
                new, mode = greedy_static(m, ids, max_new_tokens, graphs=True)
            except (TypeError, ValueError, NotImplementedError, AttributeError) as e:
                log.warning("generate: no static KV cache for this model (%s); generating with transformers' "
                            "generate", str(e).splitlines()[0][:160])
        if new is None:
            out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, use_cache=True)
            new = out[0, ids.shape[1]:].cpu()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    sec = time.perf_counter() - t
    return {"model": model, "prompt": prompt, "text": prompt + tok.decode(new, skip_special_tokens=True),
            "tokens": new.tolist(), "seconds": sec, "tokens_per_s": len(new) / sec if sec > 0 else None,
            "mode": mode, "device": str(dev), "sparse_layers": n_sparse, "merged_groups": len(merged)}
