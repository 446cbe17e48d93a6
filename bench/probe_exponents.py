"""How many bits the kept values' exponents need: a lead for a smaller value format in the one-token kernel, which
on the 70B shapes is bound by the bytes it streams (BENCHMARKS.md, session 21). A real model is pruned on the CPU
(``--pruner`` / ``--allocation`` at ``--sparsity``, a short calibration), and for every block linear the kept
values' bf16 exponents are compared with the largest exponent of their row: the share of kept values within 8 and
16 binades below it (a 3- or 4-bit exponent offset from a per-row base, so 12 or 11 bits a value instead of 16),
and the share of rows whose every kept value fits. A format built on it would stay exact by keeping the rows or
linears that do not fit in today's layout; this probe only measures how often that would be needed.

    python3 bench/probe_exponents.py --out bench/results/exponents_smollm2_cpu.json [--model smollm2-135m]

Caveat: the real models here are dequantized GGUFs (SmolLM2's linears are Q4_1), whose few distinct levels per
block narrow the exponent range; a bf16 checkpoint should be checked the same way where one is available.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layerprune.api import prune  # noqa: E402
from layerprune.models.loading import load_model  # noqa: E402

WINDOWS = (4, 8, 16)


def exponent_stats(w: torch.Tensor) -> dict:
    """Counts for one weight (zeros are pruned): kept values, and for each window the kept values and the rows whose
    kept values all lie within that many binades below the row's largest exponent."""
    w = w.detach().to(torch.bfloat16)
    nz = w != 0
    e = (w.view(torch.int16).int() >> 7) & 0xFF
    top = torch.where(nz, e, torch.zeros_like(e)).max(1, keepdim=True).values
    gap = torch.where(nz, top - e, torch.zeros_like(e))
    out = {"kept": int(nz.sum()), "rows": int(w.shape[0])}
    for win in WINDOWS:
        out[f"values_within_{win}"] = int(((gap < win) & nz).sum())
        out[f"rows_within_{win}"] = int((gap < win).all(1).sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--pruner", default="wanda")
    ap.add_argument("--allocation", default="dlp")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    a = ap.parse_args()
    model, tok = load_model(a.model)
    prune(model, tokenizer=tok, sparsity=a.sparsity, pruner=a.pruner, allocation=a.allocation, eval=[],
          nsamples=a.nsamples, seqlen=a.seqlen, device="cpu", progress=False, use_cache=False)
    tot: dict[str, int] = {}
    for mod in model.model.layers.modules():
        if isinstance(mod, torch.nn.Linear):
            for k, v in exponent_stats(mod.weight).items():
                tot[k] = tot.get(k, 0) + v
    res = {"model": a.model, "sparsity": a.sparsity, "pruner": a.pruner, "allocation": a.allocation,
           "nsamples": a.nsamples, "seqlen": a.seqlen, "torch": torch.__version__, "counts": tot,
           "share": {f"values_within_{w}": tot[f"values_within_{w}"] / tot["kept"] for w in WINDOWS}
           | {f"rows_within_{w}": tot[f"rows_within_{w}"] / tot["rows"] for w in WINDOWS}}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res["share"], indent=1))


if __name__ == "__main__":
    main()
