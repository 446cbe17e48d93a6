"""Where a model folder's load time goes on the GPU: layerprune's ``load`` (placement + tokenizer + weights)
against plain ``from_pretrained`` with ``device_map="auto"`` / ``{"": "cuda:0"}`` / the CPU then ``.to``.

    python3 bench/probe_load.py --model /dev/shm/m8b --dtype bfloat16 --out $OUT/probe_load.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    del out
    gc.collect()
    torch.cuda.empty_cache()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerprune.api import load
    from layerprune.models.loading import load_placement

    dt = getattr(torch, a.dtype)
    res = {"import_torch_s": time.perf_counter() - T0, "cuda_init_s": timed(lambda: torch.ones(1, device="cuda"))}
    res["tokenizer_s"] = timed(lambda: AutoTokenizer.from_pretrained(a.model))
    res["placement_s"] = timed(lambda: load_placement(a.model, dt, torch.device("cuda", 0)))
    for rep in range(2):
        res[f"layerprune_load_s_{rep}"] = timed(lambda: load(a.model, None, a.dtype, device=torch.device("cuda", 0)))
        res[f"auto_s_{rep}"] = timed(lambda: AutoModelForCausalLM.from_pretrained(a.model, dtype=dt, device_map="auto"))
        res[f"dict_s_{rep}"] = timed(lambda: AutoModelForCausalLM.from_pretrained(a.model, dtype=dt,
                                                                                  device_map={"": "cuda:0"}))
        res[f"cuda_str_s_{rep}"] = timed(lambda: AutoModelForCausalLM.from_pretrained(a.model, dtype=dt,
                                                                                      device_map="cuda:0"))
    res["cpu_then_to_s"] = timed(lambda: AutoModelForCausalLM.from_pretrained(a.model, dtype=dt).to("cuda"))
    print(json.dumps(res), flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
