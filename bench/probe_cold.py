"""What the first block of a fresh process pays beyond the next ones (LLaMA-2-7B dimensions, 2 blocks, random weights).

    python3 bench/probe_cold.py --out $OUT/cold.json [--dtype float16] [--variants none,cublas,...]

Each variant runs in a process of its own (a cold CUDA context, Triton's on-disk cache already filled by a first
process): import, build the model on the GPU, optionally run warm-up steps (each timed, device work finished), then
the DLP/OWL statistics sweep (``allocation.stats.dense_stats_pass`` under ``engine.fused.fused_ops``, 128 × 2048
random tokens, batches of 8) whose ``per_block_s`` gives the cold block 0 against the warm block 1.
Warm-up steps: ``triton`` (import it), ``fused`` (``engine.fused.warm_up`` in this process), ``cublas`` (one
``F.linear`` per linear shape at the batch's token count), ``sdpa`` (one causal attention call of the batch's
shape), ``engine`` (``engine.warm.warm_up_gpu``, what the command line runs on its preload thread).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CFG = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
           num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def child(steps: list[str], dtype_name: str) -> dict:
    t0 = time.perf_counter()
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, dtype_name)
    dev = torch.device("cuda")
    torch.cuda.init()
    torch.zeros(1, device=dev)
    out: dict = {"steps_s": {}}

    def step(name, fn):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out["steps_s"][name] = round(time.perf_counter() - t, 4)

    toks = 8 * 2048
    h, inter, heads = CFG["hidden_size"], CFG["intermediate_size"], CFG["num_attention_heads"]
    for s in steps:
        if s == "triton":
            step("triton", lambda: __import__("triton"))
        elif s == "fused":
            from layerprune.engine.fused import warm_up

            step("fused", lambda: warm_up({**CFG, "rms_norm_eps": 1e-5}, dt, dev))
        elif s == "cublas":
            def lin():
                for n, k in ((h, h), (inter, h), (h, inter)):
                    F.linear(torch.empty(toks, k, dtype=dt, device=dev), torch.empty(n, k, dtype=dt, device=dev))
            step("cublas", lin)
        elif s == "sdpa":
            def att():
                q = torch.zeros(8, heads, 2048, h // heads, dtype=dt, device=dev)
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            step("sdpa", att)
        elif s == "engine":
            from layerprune.engine.warm import warm_up_gpu

            step("engine", lambda: warm_up_gpu(CFG, dt, dev, toks))
    t_imp = time.perf_counter()
    from transformers import AutoModelForCausalLM, LlamaConfig

    from layerprune.allocation.stats import dense_stats_pass
    from layerprune.engine.fused import fused_ops
    from layerprune.models.adapter import ModelAdapter

    out["import_s"] = round(time.perf_counter() - t_imp, 3)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(LlamaConfig(**CFG), dtype=dt).eval()
    m.config.use_cache = False
    torch.cuda.synchronize()
    ids = torch.randint(0, CFG["vocab_size"], (128, 2048))
    with fused_ops(m, dev):
        st = dense_stats_pass(m, ModelAdapter.of(m), ids, dev, batch_size=8, progress=False)
    out["split"] = st.split
    out["cold_extra_s"] = round(st.split["per_block_s"][0] - st.split["per_block_s"][1], 4)
    out["process_s"] = round(time.perf_counter() - t0, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float16", choices=("bfloat16", "float16"))
    ap.add_argument("--variants", default="none,none,triton,fused,cublas,sdpa,triton+fused+cublas+sdpa,engine")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        print(json.dumps(child([s for s in a.child.split("+") if s and s != "none"], a.dtype)))
        return
    runs = []
    for v in a.variants.split(","):
        p = subprocess.run([sys.executable, __file__, "--out", a.out, "--dtype", a.dtype, "--child", v],
                           capture_output=True, text=True)
        row = {"variant": v, "rc": p.returncode}
        if p.returncode == 0:
            row.update(json.loads(p.stdout.strip().splitlines()[-1]))
        else:
            row["stderr"] = p.stderr[-2000:]
        print(json.dumps({k: row.get(k) for k in ("variant", "rc", "steps_s", "cold_extra_s", "process_s")}), flush=True)
        runs.append(row)
    Path(a.out).write_text(json.dumps({"dtype": a.dtype, "model": "LLaMA-2-7B dims, 2 blocks", "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
