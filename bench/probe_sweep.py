"""The DLP/OWL statistics pass against one plain dense sweep, with and without the fused RMSNorm / rotary
kernels, at LLaMA-2-7B dimensions (random bf16 weights built on the GPU, 128 × 2048 random tokens).

    python3 bench/probe_sweep.py --out $OUT/probe_sweep.json

A plain sweep is ``dense_sweep`` with no sinks (the forwards only); the statistics pass is
``dense_stats_pass`` (the same forwards with Wanda's Σx² hooks, then each block's score statistics). The
issue's goal: the statistics pass costs at most 1.3× a sweep. Both ways alternate, ``--repeat`` times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layerprune.allocation.stats import dense_stats_pass  # noqa: E402
from layerprune.engine.fused import fused_ops  # noqa: E402
from layerprune.engine.sequential import dense_sweep  # noqa: E402
from layerprune.models.adapter import ModelAdapter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=4096, help="hidden size (4096: LLaMA-2-7B; smaller for a smoke test)")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.hidden * 11008 // 4096, num_hidden_layers=a.blocks, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(a.device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    m.config.use_cache = False
    ad = ModelAdapter.of(m)
    dev = torch.device(a.device)
    ids = torch.randint(0, 32000, (a.nsamples, 2048))
    rows = []
    for rep in range(a.repeat):
        for on in (False, True):
            with fused_ops(m, dev, enabled=on):
                t = time.perf_counter()
                split = dense_sweep(m, ad, ids, dev, lambda i, lins: {}, lambda i, lins, acc: None, progress=False)
                sweep_s = time.perf_counter() - t
                t = time.perf_counter()
                st = dense_stats_pass(m, ad, ids, dev, progress=False)
                stats_s = time.perf_counter() - t
            row = {"repeat": rep, "fused": on, "sweep_s": sweep_s, "sweep_split": split, "stats_s": stats_s,
                   "stats_split": st.split, "stats_over_sweep": stats_s / sweep_s}
            rows.append(row)
            print(json.dumps(row), flush=True)
    plain = [r for r in rows if not r["fused"]]
    out = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch": torch.__version__, "dtype": "bfloat16",
           "dims": "llama2-7b", "blocks": a.blocks, "tokens": a.nsamples * 2048, "rows": rows,
           "fused_sweep_speedup": sum(r["sweep_s"] for r in plain) / sum(r["sweep_s"] for r in rows if r["fused"])}
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
