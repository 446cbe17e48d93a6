"""SparseGPT on the real smollm2-135m on the GPU: the fused Triton OBS kernel (default) and
TF32 Hessian products (opt-in) against the reference arithmetic (fp32 products, per-column loop), same model, same calibration,
same run: WikiText-2 perplexity and prune time for 50%, 70% and 2:4.

    python3 bench/sparsegpt_gpu_check.py --model PATH.gguf --out $OUT/sgpt_check.json

fp32 weights, batch 8, 128 × 2048 C4 calibration (seed 0), WikiText-2 at 2048 (all windows), as the
"Pruners (part 4)" table of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layerprune.api import EvalConfig, Session, load, prune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--patterns", default="0.5,0.7,2:4")
    a = ap.parse_args()
    model, tok, _ = load(a.model, None, "float32")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    sess = Session(model, tok, "cuda", nsamples=128, seqlen=2048, batch_size=8, progress=False, use_cache=False)
    rows = []
    for pat in a.patterns.split(","):
        kw = dict(pattern=pat, sparsity=None) if ":" in pat else dict(sparsity=float(pat))
        for label, opts in (("reference: fp32 Hessian, column loop", {"fused": False}),
                            ("default: fp32 Hessian, fused kernel", {}),
                            ("TF32 Hessian, fused kernel", {"hessian_tf32": True})):
            model.to("cpu")
            model.load_state_dict(dense)
            t = time.perf_counter()
            rec = prune(model, session=sess, pruner="sparsegpt", pruner_options=opts, device="cuda",
                        evaluation=EvalConfig(datasets=("wikitext2",), seqlen=2048), progress=False, **kw)
            row = {"pattern": pat, "variant": label, "wikitext2": rec["ppl"]["wikitext2"],
                   "prune_s": rec["timing"]["prune_seconds"], "solve_s": rec["timing"]["mask_seconds"],
                   "call_s": time.perf_counter() - t, "achieved": rec["sparsity"]["achieved"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    import transformers

    Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                       "transformers": transformers.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
