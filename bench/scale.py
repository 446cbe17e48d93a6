"""Scale on one GPU: LLaMA-2-7B dimensions (32 blocks, random bf16 weights built on the device), pruned by
``layerprune.prune`` with 128 × 2048 calibration and a perplexity evaluation, whole call split into its parts.

    python bench/scale.py --out $OUT/scale_h200.json --cases wanda:uniform,wanda:dlp,sparsegpt:uniform
    python bench/scale.py --out $OUT/sweep.json --cases sweep:none     # one plain dense forward sweep
    python bench/scale.py --out $OUT/solve.json --ab-blocks 4     # SparseGPT: fused OBS kernel vs the column loop
    python bench/scale.py --out $OUT/70b.json --dims llama2-70b --blocks 8 --cases sparsegpt:dlp   # extrapolated

Weights start on the CPU as after loading a checkpoint; the engine keeps them on the GPU when they fit
(7B/8B on an H200) and otherwise moves one block at a time. Quality is meaningless here:
calibration and evaluation use random token ids of the real sizes (no LLaMA tokenizer on the device; the
evaluation is 146 windows of 2048 tokens, WikiText-2's count for the LLaMA tokenizer's size), so times and
memory are those of the real command. ``--ab-blocks N`` times SparseGPT on the first N blocks twice in one
run: with the fused Triton OBS kernel and with the reference's per-column loop. ``--blocks N`` runs the first
N blocks only (70B dimensions: 8 of 80) and adds a row extrapolated to all blocks, labelled so. The process's
CUDA start-up is timed once before the cases (``cuda_init_s``), so no case's "load" carries it.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layerprune.api import EvalConfig, Session, prune  # noqa: E402
from layerprune.data.calibration import CalibSet  # noqa: E402
from layerprune.evaluation.perplexity import perplexity_of_windows  # noqa: E402

DIMS = {"llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
        "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
        "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                           num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)}


def build(dims: str, blocks: int | None = None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    kw = dict(DIMS[dims])
    if blocks:
        kw["num_hidden_layers"] = blocks
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(LlamaConfig(**kw), dtype=torch.bfloat16).eval()
    m.to("cpu")
    m.config.use_cache = False
    torch.cuda.empty_cache()
    return m


def sweep_case(dims: str, nsamples: int, seqlen: int, blocks: int | None = None) -> dict:
    """One plain dense forward sweep through the engine (no hooks; the model starts on the CPU and moves to the
    GPU first, as in the statistics pass): the yardstick of the DLP/OWL statistics pass."""
    from layerprune.engine.sequential import dense_sweep
    from layerprune.models.adapter import ModelAdapter

    model = build(dims, blocks)
    ids = torch.randint(0, model.config.vocab_size, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    split = dense_sweep(model, ModelAdapter.of(model), ids, torch.device("cuda"), lambda i, lins: {},
                        lambda i, lins, s: None, batch_size=8, progress=False)
    torch.cuda.synchronize()
    out = {"dims": dims, "blocks": blocks or DIMS[dims]["num_hidden_layers"], "pruner": "none",
           "allocation": "dense forward sweep", "wall_s": time.perf_counter() - t0, "split_s": split,
           "extrapolated": False}
    print(json.dumps(out), flush=True)
    del model
    torch.cuda.empty_cache()
    return out


def run_case(dims: str, pruner: str, allocation: str, nsamples: int, seqlen: int, eval_windows: int,
             blocks: int | None = None, pruner_options: dict | None = None) -> dict:
    if pruner == "sweep":  # "sweep:none"
        return sweep_case(dims, nsamples, seqlen, blocks)
    t0 = time.perf_counter()
    model = build(dims, blocks)
    load_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    sess = Session(model, None, "cuda", nsamples=nsamples, seqlen=seqlen, batch_size=8, progress=False,
                   use_cache=False)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    sess._calib = CalibSet(torch.randint(0, vocab, (nsamples, seqlen), generator=g), "random", 0, list(range(nsamples)))
    t1 = time.perf_counter()
    rec = prune(model, session=sess, sparsity=0.5, pruner=pruner, allocation=allocation, device="cuda",
                evaluation=EvalConfig(datasets=()), progress=False, pruner_options=pruner_options)
    prune_call_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    ids = torch.randint(0, vocab, (eval_windows, seqlen), generator=g)
    resident = next(model.parameters()).is_cuda  # a model that fits is left on the GPU by the prune
    model.to("cuda")  # as evaluate_ppl does: a no-op for a resident model
    ppl = perplexity_of_windows(model, ids, batch_size=4, device="cuda")
    torch.cuda.synchronize()
    eval_s = time.perf_counter() - t2
    t3 = time.perf_counter()
    model.to("cpu")  # not part of the command (the CLI moves the model back only to save --out, as export)
    back_s = time.perf_counter() - t3
    tm = rec["timing"]
    split = {"load": load_s, "statistics_or_game": tm.get("allocation_seconds") or 0.0,
             "forwards_and_hessians": tm["prune_seconds"] - tm["mask_seconds"], "solve": tm["mask_seconds"],
             "evaluation": eval_s}
    split["other"] = prune_call_s - split["statistics_or_game"] - tm["prune_seconds"]
    out = {"dims": dims, "blocks": blocks or DIMS[dims]["num_hidden_layers"], "pruner": pruner,
           "allocation": allocation, "wall_s": load_s + prune_call_s + eval_s, "split_s": split,
           "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20, "resident_after_prune": resident,
           "move_back_s_untimed": back_s,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "extrapolated": False,
           "achieved": rec["sparsity"]["achieved"], "calib_tokens_per_s": tm["calib_tokens_per_second"],
           "ppl_random_tokens": ppl, "pruner_options": pruner_options or {},
           "statistics_split_s": getattr(sess._stats, "split", None) if getattr(sess, "_stats", None) else None}
    print(json.dumps(out), flush=True)
    del model, sess
    torch.cuda.empty_cache()
    return out


def ab(blocks: int, nsamples: int, seqlen: int) -> list[dict]:
    """SparseGPT on ``blocks`` blocks in one run: the fused Triton OBS kernel (now) vs the reference's
    per-column loop (``fused=False``; before). Same Hessians, same masks rule."""
    rows = []
    for fused, label in ((True, "fused Triton OBS kernel per 128-column block (now)"),
                         (False, "reference per-column loop (before)")):
        r = run_case("llama2-7b", "sparsegpt", "uniform", nsamples, seqlen, 1, blocks, {"fused": fused})
        r["variant"] = label
        rows.append(r)
    return rows


def extrapolate(r: dict, total: int) -> dict:
    """A case run on ``r['blocks']`` of ``total`` blocks, scaled to all of them: every per-block part
    (statistics, forwards, Hessians, solve, evaluation) by total/blocks; load and the rest as measured."""
    f = total / r["blocks"]
    sp = {k: (v * f if k in ("statistics_or_game", "forwards_and_hessians", "solve", "evaluation") else v)
          for k, v in r["split_s"].items()}
    return {**r, "blocks": total, "measured_blocks": r["blocks"], "split_s": sp, "wall_s": sum(sp.values()),
            "extrapolated": True}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dims", default="llama2-7b")
    ap.add_argument("--cases", default="")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=146)
    ap.add_argument("--ab-blocks", type=int, default=0)
    ap.add_argument("--blocks", type=int, default=0, help="run only the first N blocks and extrapolate to all")
    a = ap.parse_args()
    import transformers

    t0 = time.perf_counter()
    torch.ones(1, device="cuda").sum().item()  # the process's CUDA start-up, paid once before any case
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "transformers": transformers.__version__,
           "dtype": "bfloat16", "cuda_init_s": time.perf_counter() - t0, "cases": []}
    out = Path(a.out)
    if a.ab_blocks:
        res["ab"] = ab(a.ab_blocks, a.nsamples, a.seqlen)
        out.write_text(json.dumps(res, indent=1))
    for case in [c for c in a.cases.split(",") if c]:
        pr, al = case.split(":")
        r = run_case(a.dims, pr, al, a.nsamples, a.seqlen, a.eval_windows, a.blocks or None)
        res["cases"].append(r)
        if a.blocks and a.blocks < DIMS[a.dims]["num_hidden_layers"]:
            res["cases"].append(extrapolate(r, DIMS[a.dims]["num_hidden_layers"]))
        out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
