"""Where a 7B prune's time goes, op by op, on the GPU (LLaMA-2-7B dimensions, random bf16 (``--dtype``) weights, 2 blocks).

    python3 bench/probe_forward.py --out $OUT/probe.json

Times (CUDA events, median of 5): one block forward over 8 × 2048 tokens (and its TFLOP/s), the same with
Wanda's and SparseGPT's accumulation hooks, a block's host→GPU copy from pageable and from pinned memory,
and SparseGPT's OBS solve of the q/k/v group (12288 × 4096) and of down_proj (4096 × 11008) with the fused
kernel and with the reference's column loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layerprune.engine.runner import BlockRunner  # noqa: E402
from layerprune.engine.sequential import feed_hooks  # noqa: E402
from layerprune.models.adapter import ModelAdapter  # noqa: E402
from layerprune.pruners import Pattern  # noqa: E402
from layerprune.pruners.sparsegpt import SparseGPTOptions, SparseGPTPruner  # noqa: E402
from layerprune.pruners.wanda import WandaPruner  # noqa: E402


def timed(fn, n=5) -> float:
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="block,hooks,copy,solve",
                    help="comma list of block, hooks, copy, solve, sdpa (the block under each SDPA backend), "
                         "kernels (the block's CUDA kernels by time, from the profiler), fused (the block with "
                         "layerprune's fused RMSNorm and rotary kernels, its output against the plain one's, "
                         "and its kernels)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    dt = getattr(torch, a.dtype)
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=dt).eval()
    m.config.use_cache = False
    ad = ModelAdapter.of(m)
    dev = torch.device("cuda")
    ids = torch.randint(0, 32000, (8, 2048))
    r = BlockRunner(m, ad, ids, dev, batch_size=8)
    blk = ad.blocks[0]
    out: dict = {"dtype": a.dtype, "attn_implementation": m.config._attn_implementation, "kwargs": sorted(r.kwargs[0][0])}
    nparam = sum(p.numel() for p in blk.parameters())
    flops = 2 * nparam * 8 * 2048 + 2 * 8 * 32 * 2048 * 2048 * 128  # linears + causal QKᵀ and AV (forward)
    out["block_forward_s"] = timed(lambda: r.run(0, store=False))
    out["block_tflops"] = flops / out["block_forward_s"] / 1e12
    if "sdpa" in parts:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for be in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            try:
                with sdpa_kernel([getattr(SDPBackend, be)]):
                    out[f"block_forward_{be.lower()}_s"] = timed(lambda: r.run(0, store=False))
            except RuntimeError as e:  # backend not available for these inputs
                out[f"block_forward_{be.lower()}_s"] = f"unavailable: {str(e).splitlines()[0][:200]}"
    if "kernels" in parts:
        out["kernels_ms"] = kernels(r)
    if "fused" in parts:
        from layerprune.engine.fused import fused_ops

        x0 = r.acts[0].clone()
        plain = blk(x0, *r.args[0][0], **r.kwargs[0][0])
        plain = plain[0] if isinstance(plain, tuple) else plain
        with fused_ops(m, dev) as done:
            fused = blk(x0, *r.args[0][0], **r.kwargs[0][0])
            fused = fused[0] if isinstance(fused, tuple) else fused
            out["fused_replaced"] = done
            out["block_forward_fused_s"] = timed(lambda: r.run(0, store=False))
            out["fused_kernels_ms"] = kernels(r)
        out["block_forward_plain_again_s"] = timed(lambda: r.run(0, store=False))
        out["fused_output_equal"] = bool(torch.equal(plain, fused))
        out["fused_output_max_abs_diff"] = float((plain.float() - fused.float()).abs().max())
        out["block_fused_speedup"] = out["block_forward_plain_again_s"] / out["block_forward_fused_s"]
    lins = ad.linears(0)
    for name, mk in (("wanda", lambda l: WandaPruner(l)), ("sparsegpt", lambda l: SparseGPTPruner(l))):
        if "hooks" not in parts:
            break
        def fwd():
            sinks = {n: mk(l) for n, l in lins.items()}
            with feed_hooks(lins, sinks, {}):
                r.run(0, store=False)
        out[f"block_forward_with_{name}_hooks_s"] = timed(fwd, 3)
    if "copy" not in parts and "solve" not in parts:
        return finish(a.out, out)
    blk.to("cpu")
    out["block_h2d_pageable_s"] = timed(lambda: blk.to("cuda"), 1)
    blk.to("cpu")
    for p in blk.parameters():
        p.data = p.data.pin_memory()
    out["block_h2d_pinned_s"] = timed(lambda: blk.to("cuda"), 1)
    out["block_gb"] = nparam * 2 / 1e9
    X = torch.randn(8 * 2048, 4096, device=dev, dtype=dt)
    Xd = torch.randn(8 * 2048, 11008, device=dev, dtype=dt)
    for name, rows, k, x in (("qkv", 12288, 4096, X), ("down", 4096, 11008, Xd)):
        for fused in (True, False):
            lin = torch.nn.Linear(k, rows, bias=False, device=dev, dtype=dt)
            p = SparseGPTPruner(lin, SparseGPTOptions(fused=fused))
            p.add_batch(x)
            w0 = lin.weight.data.clone()

            def solve():
                lin.weight.data = w0.clone()
                p.prune(Pattern(0.5))
            out[f"solve_{name}_{'fused' if fused else 'loop'}_s"] = timed(solve, 2)
    finish(a.out, out)


def kernels(r) -> list[dict]:
    """The CUDA kernels of one forward of block 0 over every batch, longest first (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    r.run(0, store=False)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r.run(0, store=False)
        torch.cuda.synchronize()
    rows = sorted(((e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages()), key=lambda t: -t[1])
    return [{"kernel": k[:120], "ms": round(ms, 3), "calls": c} for k, ms, c in rows[:25] if ms > 0]


def finish(path: str, out: dict) -> None:
    print(json.dumps(out, indent=1))
    Path(path).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, **out},
                                     indent=1))


if __name__ == "__main__":
    main()
