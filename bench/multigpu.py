"""Data-parallel pruning on several GPUs of one host, LLaMA-2-7B dimensions (random bf16 weights, the same on
every rank: one seed), 128 × 2048 random-token calibration, through ``layerprune.prune`` under torchrun.

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    C=wanda:uniform,wanda:dlp,sparsegpt:uniform,sparsegpt:dlp
    python3 bench/multigpu.py --cases $C --out $OUT/g1.json                          # one GPU
    torchrun --nproc-per-node 2 bench/multigpu.py --cases $C --out $OUT/g2.json --ref $OUT/g1.json
    python3 bench/multigpu.py --game --blocks 32 --out $OUT/game1.json               # the SV-NUP game
    torchrun --nproc-per-node 2 bench/multigpu.py --game --blocks 32 --out $OUT/game2.json

One model is built per process and restored to its dense weights before each case. Rank 0 writes each
prune call's time (the model built and on its GPU, as the CLI now loads a checkpoint that fits; ``--start-on
cpu``: on the CPU, as it loaded before), its split and the peak
memory of every GPU; ``--ref`` compares its masks with the one-GPU run's (a sample of every linear's mask
is saved next to the JSON).
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


def _peaks(dev) -> list[float]:
    peak = torch.tensor([torch.cuda.max_memory_allocated(dev) / 2**20], device=dev)
    if world_size() == 1:
        return [float(peak)]
    allp = [torch.zeros_like(peak) for _ in range(world_size())]
    torch.distributed.all_gather(allp, peak)
    return [float(p) for p in allp]


def _mask_sample(model) -> dict:
    g = torch.Generator().manual_seed(1)
    sample = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "layers" in n:
            w = m.weight.data
            idx = torch.randint(0, w.numel(), (4096,), generator=g).to(w.device)
            sample[n] = (w.flatten()[idx] == 0).cpu()
    return sample


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="wanda:uniform", help="pruner:allocation,... (one model, restored per case)")
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--ref", default=None, help="the one-GPU run's JSON: compare masks with its samples")
    ap.add_argument("--game", action="store_true", help="time the SV-NUP game instead (window 4, --sv-samples windows)")
    ap.add_argument("--pruner", default="sparsegpt", help="the game's base pruner")
    ap.add_argument("--sv-samples", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1, help="run the list of cases this many times (rows carry 'repeat')")
    ap.add_argument("--start-on", choices=("gpu", "cpu"), default="gpu",
                    help="where the weights are when each prune call starts: gpu (as the CLI now loads a model that "
                         "fits), cpu (as before: the call moves the model to the GPU)")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    dev = init_from_env("cuda")
    t0 = time.perf_counter()
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=a.blocks, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    home = "cpu" if a.start_on == "cpu" or a.game else dev
    model.to(home)
    model.config.use_cache = False
    torch.cuda.empty_cache()
    load_s = time.perf_counter() - t0
    ids = torch.randint(0, 32000, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))

    def session() -> Session:
        sess = Session(model, None, dev, nsamples=a.nsamples, seqlen=a.seqlen, batch_size=8, progress=False,
                       use_cache=False)
        sess._calib = CalibSet(ids, "random", 0, list(range(a.nsamples)))
        return sess

    out = Path(a.out)
    if a.game:
        sess = session()
        sess._sv = torch.randint(0, 32000, (max(32, a.sv_samples), a.seqlen), generator=torch.Generator().manual_seed(1))
        torch.cuda.reset_peak_memory_stats(dev)
        t1 = time.perf_counter()
        alloc = sess.allocate("svnup", 0.5, {"window": 4, "sv_samples": a.sv_samples}, pruner=a.pruner)
        d = alloc.diagnostics
        peaks = _peaks(dev)
        if is_main():
            res = {"gpus": world_size(), "pruner": a.pruner, "blocks": a.blocks, "evaluations": d["evaluations"],
                   "evaluations_per_rank": d["evaluations_per_rank"], "sv_seconds": d["sv_seconds"],
                   "evals_per_s": d["evaluations"] / d["sv_seconds"], "setup_seconds": d["setup_seconds"],
                   "phi": d["phi"], "wall_s": time.perf_counter() - t1, "sv_tokens": a.sv_samples * a.seqlen,
                   "peak_gpu_mb_per_rank": peaks}
            out.write_text(json.dumps(res, indent=1))
            print(json.dumps({k: v for k, v in res.items() if k != "phi"}), flush=True)
        return
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    ref = json.loads(Path(a.ref).read_text()) if a.ref else None
    rows, samples = [], {}
    for rep, case in [(r, c) for r in range(a.repeat) for c in a.cases.split(",")]:
        pruner, allocation = case.split(":")
        model.to(home)
        model.load_state_dict(dense)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        t1 = time.perf_counter()
        rec = prune(model, session=session(), sparsity=0.5, pruner=pruner, allocation=allocation, device="cuda",
                    evaluation=EvalConfig(datasets=()), progress=False)
        prune_s = time.perf_counter() - t1
        peaks = _peaks(dev)
        if not is_main():
            continue
        sample = _mask_sample(model)
        samples[case] = sample
        agree = None
        if ref is not None:
            rs = torch.load(Path(a.ref).with_suffix(".masks.pt"))[case]
            agree = sum(int((rs[k] == sample[k]).sum()) for k in rs) / sum(v.numel() for v in rs.values())
        tm = rec["timing"]
        row = {"gpus": world_size(), "pruner": pruner, "allocation": allocation, "blocks": a.blocks, "repeat": rep,
               "start_on": a.start_on,
               "wall_s": prune_s, "split_s": {"statistics": tm.get("allocation_seconds") or 0.0,
                                              "forwards": tm["prune_seconds"] - tm["mask_seconds"],
                                              "solve": tm["mask_seconds"],
                                              "other": prune_s - (tm.get("allocation_seconds") or 0.0)
                                              - tm["prune_seconds"]},
               "peak_gpu_mb_per_rank": peaks, "achieved": rec["sparsity"]["achieved"],
               "per_block": rec["per_block"], "mask_agreement_with_ref": agree}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_block"}), flush=True)
    if is_main():
        torch.save(samples, out.with_suffix(".masks.pt"))
        res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "load_s": load_s,
               "nccl_env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                           "NVSHMEM_DISABLE_NVLS")}, "prune": rows}
        out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
