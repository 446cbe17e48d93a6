"""Generation with a model spec or a sparse directory (``layerprune generate``)."""

from __future__ import annotations

import time

import torch

from layerprune.errors import UserError


def generate(model: str, prompt: str, max_new_tokens: int = 32, device: str = "auto", dtype: str = "float32",
             trust_remote_code: bool = False, merge: bool = True) -> dict:
    """Greedy continuation of ``prompt``; a sparse directory runs its ``SparseLinear`` layers, with the linears
    that read one input stacked (``merge``, :mod:`layerprune.sparse.merge`)."""
    from layerprune.engine.fused import fused_ops
    from layerprune.models.loading import check_model_spec, load_model, parse_dtype
    from layerprune.sparse.linear import SparseLinear
    from layerprune.sparse.merge import merge_siblings
    from layerprune.utils import resolve_device

    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    check_model_spec(model)
    dev = resolve_device(device)
    m, tok = load_model(model, dtype=parse_dtype(dtype), device=dev, trust_remote_code=trust_remote_code)
    n_sparse = sum(isinstance(x, SparseLinear) for x in m.modules())
    merged = merge_siblings(m) if merge and n_sparse else []
    ids = tok(prompt, return_tensors="pt").input_ids.to(dev)
    t = time.perf_counter()
    with torch.no_grad(), fused_ops(m, dev):
        out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, use_cache=True)
    sec = time.perf_counter() - t
    new = out[0, ids.shape[1]:]
    return {"model": model, "prompt": prompt, "text": prompt + tok.decode(new, skip_special_tokens=True),
            "tokens": new.tolist(), "seconds": sec, "device": str(dev),
            "sparse_layers": n_sparse, "merged_groups": len(merged)}
