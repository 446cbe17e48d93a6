"""Data-parallel pruning on several GPUs of one host, LLaMA-2-7B dimensions (random bf16 weights, the same on
every rank: one seed), 128 × 2048 random-token calibration, through ``layerprune.prune`` under torchrun.

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    python3 bench/multigpu.py --pruner wanda --out $OUT/g1.json                      # one GPU
    torchrun --nproc-per-node 2 bench/multigpu.py --pruner wanda --out $OUT/g2.json --ref $OUT/g1.masks.pt

Rank 0 writes the whole-call time, its split and peak memory per GPU; ``--ref`` compares its masks with
the one-GPU run's (a sample of every linear's mask is saved next to the JSON).
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

from layerprune.api import EvalConfig, Session, prune  # noqa: E402
from layerprune.data.calibration import CalibSet  # noqa: E402
from layerprune.distributed import init_from_env, is_main, world_size  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--pruner", default="wanda")
    ap.add_argument("--allocation", default="uniform")
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--ref", default=None)
    ap.add_argument("--game", action="store_true", help="time the SV-NUP game instead (window 4, --sv-samples windows)")
    ap.add_argument("--sv-samples", type=int, default=8)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    dev = init_from_env("cuda")
    t0 = time.perf_counter()
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=a.blocks, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    model.to("cpu")
    model.config.use_cache = False
    torch.cuda.empty_cache()
    load_s = time.perf_counter() - t0
    sess = Session(model, None, dev, nsamples=a.nsamples, seqlen=a.seqlen, batch_size=8, progress=False,
                   use_cache=False)
    ids = torch.randint(0, 32000, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))
    sess._calib = CalibSet(ids, "random", 0, list(range(a.nsamples)))
    torch.cuda.reset_peak_memory_stats(dev)
    if a.game:
        sess._sv = torch.randint(0, 32000, (max(32, a.sv_samples), a.seqlen), generator=torch.Generator().manual_seed(1))
        t1 = time.perf_counter()
        alloc = sess.allocate("svnup", 0.5, {"window": 4, "sv_samples": a.sv_samples}, pruner=a.pruner)
        d = alloc.diagnostics
        if is_main():
            res = {"gpus": world_size(), "pruner": a.pruner, "blocks": a.blocks, "evaluations": d["evaluations"],
                   "evaluations_per_rank": d["evaluations_per_rank"], "sv_seconds": d["sv_seconds"],
                   "evals_per_s": d["evaluations"] / d["sv_seconds"], "setup_seconds": d["setup_seconds"],
                   "phi": d["phi"], "wall_s": time.perf_counter() - t1, "sv_tokens": a.sv_samples * a.seqlen}
            Path(a.out).write_text(json.dumps(res, indent=1))
            print(json.dumps({k: v for k, v in res.items() if k != "phi"}), flush=True)
        return
    t1 = time.perf_counter()
    rec = prune(model, session=sess, sparsity=0.5, pruner=a.pruner, allocation=a.allocation, device="cuda",
                evaluation=EvalConfig(datasets=()), progress=False)
    prune_s = time.perf_counter() - t1
    peak = torch.tensor([torch.cuda.max_memory_allocated(dev) / 2**20], device=dev)
    if world_size() > 1:
        allp = [torch.zeros_like(peak) for _ in range(world_size())]
        torch.distributed.all_gather(allp, peak)
        peaks = [float(p) for p in allp]
    else:
        peaks = [float(peak)]
    if not is_main():
        return
    g = torch.Generator().manual_seed(1)
    sample = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "layers" in n:
            w = m.weight.data
            idx = torch.randint(0, w.numel(), (4096,), generator=g)
            sample[n] = (w.flatten()[idx] == 0)
    out = Path(a.out)
    torch.save(sample, out.with_suffix(".masks.pt"))
    agree = None
    if a.ref:
        ref = torch.load(a.ref)
        tot = sum(v.numel() for v in ref.values())
        agree = sum(int((ref[k] == sample[k]).sum()) for k in ref) / tot
    tm = rec["timing"]
    res = {"gpus": world_size(), "pruner": a.pruner, "allocation": a.allocation, "blocks": a.blocks,
           "wall_s": load_s + prune_s, "load_s": load_s, "prune_call_s": prune_s,
           "split_s": {"statistics": tm.get("allocation_seconds"), "forwards": tm["prune_seconds"] - tm["mask_seconds"],
                       "solve": tm["mask_seconds"]},
           "peak_gpu_mb_per_rank": peaks, "achieved": rec["sparsity"]["achieved"],
           "mask_agreement_with_ref": agree, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "nccl_env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                       "NVSHMEM_DISABLE_NVLS")}}
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
