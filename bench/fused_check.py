"""The fused RMSNorm / rotary kernels against the model's own code on a real model, in one process on the GPU:
dense perplexity, then prune + perplexity with each pruner, each way (``fused_ops`` on and off), and how many
mask entries the two ways choose differently.

    python3 bench/fused_check.py --model SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT/fused_check.json

bf16 on the GPU (the dtype where both kernels serve), 128 × 2048 C4 calibration, WikiText-2 at 2048 (all
windows), sparsity 0.5, DLP allocation, no caches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import layerprune  # noqa: E402
from layerprune.api import EvalConfig  # noqa: E402
from layerprune.engine import fused  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--pruners", default="wanda,sparsegpt")
    ap.add_argument("--allocation", default="dlp")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--max-windows", type=int, default=None, help="WikiText-2 windows (default: all)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    ev = EvalConfig(datasets=("wikitext2",), max_windows=a.max_windows)
    dev = torch.device(a.device)
    res: dict = {"model": a.model, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                 "dtype": "bfloat16", "nsamples": a.nsamples, "max_windows": a.max_windows,
                 "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
                 "dense": {}, "runs": []}
    for on in (False, True):
        fused.ENABLED = on
        t = time.perf_counter()
        r = layerprune.evaluate(a.model, ppl=["wikitext2"], device=a.device, dtype="bfloat16",
                                max_windows=a.max_windows)
        res["dense"]["fused" if on else "plain"] = {"ppl": r["ppl"]["wikitext2"], "seconds": time.perf_counter() - t,
                                                    "fused_kernels": r.get("fused_kernels")}
        print(json.dumps(res["dense"]), flush=True)
    for pruner in a.pruners.split(","):
        masks = {}
        for on in (False, True):
            fused.ENABLED = on
            rec = layerprune.prune(a.model, sparsity=a.sparsity, pruner=pruner, allocation=a.allocation,
                                   evaluation=ev, device=a.device, dtype="bfloat16", use_cache=False,
                                   progress=False, keep_model=True, nsamples=a.nsamples)
            mdl = rec.pop("_model")
            rec.pop("_tokenizer")
            masks[on] = {n: (p == 0).cpu() for n, p in mdl.named_parameters() if p.dim() == 2 and "layers" in n}
            row = {"pruner": pruner, "allocation": a.allocation, "fused": on, "ppl": rec["ppl"]["wikitext2"],
                   "per_block": rec["per_block"], "achieved": rec["sparsity"]["achieved"],
                   "fused_kernels": rec.get("fused_kernels"),
                   "timing": {k: v for k, v in rec["timing"].items() if k.endswith("_seconds")}}
            res["runs"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "per_block"}), flush=True)
            del mdl
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        total = sum(m.numel() for m in masks[True].values())
        diff = sum(int((masks[True][n] != masks[False][n]).sum()) for n in masks[True])
        res["runs"][-1]["mask_entries_differing"] = diff
        res["runs"][-1]["mask_fraction_differing"] = diff / total
        print(pruner, "mask entries differing:", diff, "of", total, flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
