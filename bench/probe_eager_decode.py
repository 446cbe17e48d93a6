"""Decode without CUDA graphs, as ``layerprune generate`` runs it (Hugging Face ``generate``, eager), dense against
sparse: LLaMA-2-7B dims (random bf16, every block linear masked at random to ``--sparsity``, ``sparsify``, q/k/v and
gate/up stacked in both models), batch 1. Per model: tokens/s of ``sparse.bench.decode_rate`` eager and with CUDA
graphs, of ``model.generate`` (greedy, ``--new-tokens``, the fused norms on, as ``sparse.runtime.generate``), and of
``sparse.runtime.greedy_static`` as a whole call, also in session 30's form whose warm-up steps were thrown away.
With ``--direct both`` the sparse model also runs with ``linear.DIRECT`` off (every call through the dispatcher).

    python3 bench/probe_eager_decode.py --out $OUT/eager_decode.json [--layers 32] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def generate_rate(model, new_tokens: int, reps: int = 3) -> float:
    from layerprune.engine.fused import fused_ops

    dev = next(model.parameters()).device
    ids = torch.randint(10, 32000, (1, 32), generator=torch.Generator().manual_seed(0)).to(dev)
    rates = []
    with torch.no_grad(), fused_ops(model, dev):
        for i in range(reps + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, use_cache=True)
            torch.cuda.synchronize()
            if i:
                rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t))
    return sorted(rates)[len(rates) // 2]


def greedy_static_discarding(model, ids, max_new_tokens: int):
    """Session 30's form of ``greedy_static``, for the side-by-side: its three warm-up steps redo the first step's
    position and are thrown away (no end-of-sequence check: the probe runs the full length)."""
    from transformers import StaticCache

    from layerprune.sparse.bench import cache_kwarg, step_runner

    n = ids.shape[1]
    cache = StaticCache(config=model.config, max_batch_size=1, max_cache_len=n + max_new_tokens)
    out = model(input_ids=ids, **{cache_kwarg(model): cache}, cache_position=torch.arange(n, device=ids.device),
                use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    pos = torch.tensor([n], device=ids.device)
    new = torch.empty(1, max_new_tokens, dtype=torch.long, device=ids.device)
    new[:, :1] = tok
    run, mode = step_runner(model, cache, tok, pos, True, length=n + max_new_tokens)
    for done in range(1, max_new_tokens):
        nxt = run()
        new[:, done:done + 1] = nxt
        tok.copy_(nxt)
        pos.add_(1)
    return new[0], mode


def static_rate(model, new_tokens: int, reps: int = 7, fn=None) -> float:
    """Tokens/s of ``sparse.runtime.greedy_static`` (what ``layerprune generate`` runs on a GPU) as a whole call: the
    prefill, the three warm-up steps and the capture included."""
    from layerprune.engine.fused import fused_ops
    from layerprune.sparse.runtime import greedy_static

    dev = next(model.parameters()).device
    ids = torch.randint(10, 32000, (1, 32), generator=torch.Generator().manual_seed(0)).to(dev)
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # random weights: run the full length
    rates = []
    try:
        with torch.no_grad(), fused_ops(model, dev):
            for i in range(reps + 1):
                torch.cuda.synchronize()
                t = time.perf_counter()
                new, _ = (fn or greedy_static)(model, ids, new_tokens)
                torch.cuda.synchronize()
                if i:
                    rates.append(len(new) / (time.perf_counter() - t))
    finally:
        model.generation_config.eos_token_id = eos
    return sorted(rates)[len(rates) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--direct", default="on", choices=("on", "both"))
    a = ap.parse_args()
    from layerprune.sparse import linear
    from layerprune.sparse.bench import decode_rate

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sparse_decode import masked_pair

    dense, sparse = masked_pair(a.layers, a.sparsity, merge=True)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "sparsity": a.sparsity,
           "layers": a.layers, "new_tokens": a.new_tokens, "models": {}}
    runs = [("dense", dense, True), ("sparse", sparse, True)]
    if a.direct == "both":
        runs.append(("sparse_dispatcher", sparse, False))
    for name, m, direct in runs:
        old, linear.DIRECT = linear.DIRECT, direct
        try:
            r = {"eager_tok_s": decode_rate(m, 1, 32, a.new_tokens, False, vocab_hi=32000)[0],
                 "graph_tok_s": decode_rate(m, 1, 32, a.new_tokens, True, vocab_hi=32000)[0],
                 "generate_tok_s": generate_rate(m, a.new_tokens),
                 "static_generate_tok_s": static_rate(m, a.new_tokens),
                 "static_discarding_tok_s": static_rate(m, a.new_tokens, fn=greedy_static_discarding)}
        finally:
            linear.DIRECT = old
        res["models"][name] = r
        print(name, {k: round(v, 1) for k, v in r.items()}, flush=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    d = res["models"]["dense"]
    for name, r in res["models"].items():
        if name != "dense":
            res[f"{name}_speedup"] = {k: r[k] / d[k] for k in r}
            print(name, "vs dense", {k: round(v, 3) for k, v in res[f"{name}_speedup"].items()}, flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
