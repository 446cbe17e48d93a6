"""A model larger than the (capped) GPU memory prunes: LLaMA-2-7B dimensions, 16 blocks, random bf16 weights.

    python bench/capped_synthetic.py --cap-gib 4 --layers 16 --nsamples 16

Weights live on the CPU; the engine moves one block at a time to the GPU and streams the calibration
activations from pinned CPU memory. Quality is meaningless here (random weights); time and memory are real.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from layerprune.engine.sequential import prune_sequential  # noqa: E402
from layerprune.models.adapter import ModelAdapter  # noqa: E402
from layerprune.pruners import Pattern  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--cap-gib", type=float, default=4.0)
ap.add_argument("--layers", type=int, default=16)
ap.add_argument("--nsamples", type=int, default=16)
ap.add_argument("--seqlen", type=int, default=2048)
ap.add_argument("--pruner", default="wanda")
ap.add_argument("--out", default=os.environ.get("OUT", ".") + "/capped.json")
a = ap.parse_args()
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                  num_hidden_layers=a.layers, vocab_size=32000, max_position_embeddings=4096)
t = time.perf_counter()
with torch.device("cpu"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
model.config.use_cache = False
build_s = time.perf_counter() - t
size = sum(p.numel() * p.element_size() for p in model.parameters())
total = torch.cuda.get_device_properties(0).total_memory
torch.cuda.set_per_process_memory_fraction(a.cap_gib * 2**30 / total)
ad = ModelAdapter.of(model)
ids = torch.randint(0, 32000, (a.nsamples, a.seqlen))
plan = {ad.full_name(i, n): Pattern(0.5) for i in range(ad.n_blocks) for n in ad.linear_names[i]}
t = time.perf_counter()
res = prune_sequential(model, ad, ids, plan, a.pruner, torch.device("cuda"), batch_size=1, offload="cpu", progress=False)
rec = {"model_gib": size / 2**30, "cap_gib": a.cap_gib, "layers": a.layers, "pruner": a.pruner, "nsamples": a.nsamples,
       "seqlen": a.seqlen, "build_seconds": build_s, "prune_seconds": res.seconds, "peak_mem_gib": (res.peak_mem_mb or 0) / 1024,
       "achieved": res.achieved(), "tokens_per_second_calib": res.calib_tokens * res.block_forwards / res.seconds,
       "device": torch.cuda.get_device_name(0), "torch": torch.__version__}
Path(a.out).write_text(json.dumps(rec, indent=1))
print(json.dumps(rec))
