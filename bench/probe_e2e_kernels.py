"""Where a decode step's GPU time goes, dense against sparse: the kernels of a few eager decode steps of a
LLaMA-2-7B-dims model (random bf16, every block linear masked to ``--sparsity`` at random, then ``sparsify``)
under ``torch.profiler``, summed per kernel name and divided by the steps; next to it the step time of the same
step replayed as a CUDA graph (``sparse.bench.decode_rate``). Question (BENCHMARKS.md, session 14): the
per-linear table predicts ≈ 1.6× for the 7B step at 70%, the end-to-end run measures 1.37×: which kernels
take the difference?

    python3 bench/probe_e2e_kernels.py --out $OUT/e2e_kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def kernels_per_step(model, steps: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    from layerprune.sparse.bench import prefilled

    cache, tok, pos = prefilled(model, 1, 32, 64 + steps + 8)
    for _ in range(3):
        model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
        torch.cuda.synchronize()
    per: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name[:90]] += ev.device_time / steps  # µs
    return dict(sorted(per.items(), key=lambda t: -t[1]))


def compiled_rate(model, new_tokens: int = 64) -> tuple[float, float]:
    """Decode tokens/s (batch 1) with the step compiled by ``torch.compile`` (Inductor fuses the norms, rotary and
    residual adds; the sparse op stays one opaque op) and replayed as a CUDA graph; and the compile seconds."""
    import time

    from layerprune.sparse.bench import prefilled

    dev = next(model.parameters()).device
    cache, tok, pos = prefilled(model, 1, 32, 32 + new_tokens + 8)

    @torch.compile(fullgraph=True, dynamic=False)
    def step(tok, pos):
        return model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits[:, -1:].argmax(-1)

    t = time.perf_counter()
    s = torch.cuda.Stream(dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(s):
        for _ in range(3):
            step(tok, pos)
    torch.cuda.current_stream(dev).wait_stream(s)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step(tok, pos)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(new_tokens):
        g.replay()
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - t), compile_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--compile", action="store_true", help="also time the step compiled by torch.compile")
    a = ap.parse_args()
    from layerprune.sparse.bench import decode_rate

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sparse_decode import masked_pair

    dense, sparse = masked_pair(a.layers, a.sparsity)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "sparsity": a.sparsity,
           "layers": a.layers, "steps": a.steps}
    with torch.no_grad():
        for name, m in (("dense", dense), ("sparse", sparse)):
            k = kernels_per_step(m, a.steps)
            rate, mode = decode_rate(m, 1, 32, 64, True, vocab_hi=32000)
            res[name] = {"graph_tok_s": rate, "graph_step_ms": 1e3 / rate, "mode": mode,
                         "kernel_us_per_step": sum(k.values()), "kernels": k}
            print(name, f"graph {1e3 / rate:.3f} ms/step, eager kernels {sum(k.values()) / 1e3:.3f} ms/step", flush=True)
            if a.compile:
                crate, cs = compiled_rate(m)
                res[name].update(compiled_tok_s=crate, compiled_step_ms=1e3 / crate, compile_s=cs)
                print(name, f"compiled + graph {1e3 / crate:.3f} ms/step (compile {cs:.0f} s)", flush=True)
            Path(a.out).write_text(json.dumps(res, indent=1))
            for kn, us in list(k.items())[:12]:
                print(f"   {us:9.1f} us  {kn}", flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
