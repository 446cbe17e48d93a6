"""A minute's check of the engine on the GPU before timed runs: a tiny LLaMA pruned on the CPU and on the GPU
(model resident, and moved block by block), Wanda and SparseGPT with DLP statistics. Prints one JSON line
with the mask agreement and the statistics' differences; exits 1 when they disagree.

    python3 bench/check_engine_gpu.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import tiny_model  # noqa: E402
from layerprune.allocation.stats import dense_stats_pass  # noqa: E402
from layerprune.engine.sequential import prune_sequential  # noqa: E402
from layerprune.models.adapter import ModelAdapter  # noqa: E402
from layerprune.pruners import Pattern  # noqa: E402


def run(device: str, resident: bool | None, pruner: str) -> tuple[dict, list]:
    m = tiny_model("llama", layers=4, seed=5)
    ad = ModelAdapter.of(m)
    ids = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))
    dev = torch.device(device)
    st = dense_stats_pass(m, ad, ids, dev, batch_size=2, progress=False)
    plan = {ad.full_name(i, n): Pattern(0.6) for i in range(ad.n_blocks) for n in ad.linear_names[i]}
    prune_sequential(m, ad, ids, plan, pruner, dev, batch_size=2, progress=False, resident=resident)
    return {k: v.detach().cpu() for k, v in m.state_dict().items()}, [b["median"] for b in st.per_block]


def main() -> int:
    out, ok = {}, True
    for pruner in ("wanda", "sparsegpt"):
        ref_sd, ref_med = run("cpu", None, pruner)
        for resident in (True, False):
            sd, med = run("cuda", resident, pruner)
            agree = min(float(((sd[k] == 0) == (ref_sd[k] == 0)).float().mean()) for k in sd if k.endswith("proj.weight"))
            dmed = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(med, ref_med))
            out[f"{pruner}_resident_{resident}"] = {"min_mask_agreement": agree, "max_rel_median_diff": dmed}
            ok &= agree > 0.99 and dmed < 1e-3
    print(json.dumps({"ok": ok, **out}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
