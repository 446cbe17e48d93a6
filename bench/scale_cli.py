"""The whole `layerprune prune` command at 7B-8B dimensions on one GPU, as a user runs it: a model folder on
local disk (random weights with the real dimensions, written once with a real tokenizer), the real C4
calibration sampling and the real WikiText-2 evaluation, one process per case, timed from spawn to exit.

    python3 bench/scale_cli.py --make /dev/shm/m7b --tokenizer .stage/smoltok --dims llama2-7b
    LAYERPRUNE_DATA=$PWD/.devdata python3 bench/scale_cli.py --model /dev/shm/m7b \\
        --cases wanda:dlp,sparsegpt:dlp --out $OUT/scale_cli.json

Each row has the wall time of the process, its split from the run record (load, statistics or game,
forwards and Hessians, solve, evaluation; "process" = start-up and exit, the rest of the wall time), the peak
GPU memory the driver reports for the process's GPU (``nvidia-smi`` polled every 0.2 s: allocator pools
and the CUDA context included) and the child's peak RSS (``wait4``). The folder's tokenizer is SmolLM2's
(49,152 tokens; the vocabulary is sized to it), so the evaluation is WikiText-2's test split in that
tokenizer (LLaMA-2's would give 163 windows of 2048 instead of this one's count; the record says which).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIMS = {"llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, max_position_embeddings=4096),
        "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0),
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=4096)}


def make(out: str, dims: str, tokenizer: str, dtype: str, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **DIMS[dims])
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    m.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"model_dir": out, "dims": dims, "params": sum(p.numel() for p in m.parameters()), "vocab": len(tok),
            "dtype": dtype, "write_s": time.perf_counter() - t}


class GpuPeak:
    """The largest ``memory.used`` nvidia-smi reports for GPU ``index`` while running (MiB)."""

    def __init__(self, index: int = 0) -> None:
        self.index, self.peak, self._stop = index, 0.0, threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", str(self.index)], capture_output=True, text=True, timeout=5).stdout
                self.peak = max(self.peak, float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> "GpuPeak":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def run_case(model: str, dims: str, pruner: str, allocation: str, extra: list[str], timeout: float,
             logdir: Path, device: str = "cuda", cwd: Path = ROOT, tag: str = "") -> dict:
    cmd = [sys.executable, "-m", "layerprune.cli", "prune", model, "--pruner", pruner, "--allocation", allocation,
           "--sparsity", "0.5", "--dtype", "bfloat16", "--device", device, "--eval", "wikitext2", "--json",
           "--quiet", "--no-cache", *extra]  # no cached statistics or allocation: every case computes its own
    log = logdir / f"{pruner}_{allocation}{tag}.log"
    t0 = time.perf_counter()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    with GpuPeak(int(visible)) as gpu, log.open("w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=cwd)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        timer.cancel()
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    row = {"dims": dims, "pruner": pruner, "allocation": allocation, "command": " ".join(cmd[1:]), "exit": code,
           "code": "this checkout" if cwd == ROOT else str(cwd),
           "wall_s": wall, "peak_gpu_mb": gpu.peak, "peak_rss_mb": usage.ru_maxrss / 1024, "extrapolated": False}
    if code != 0 or "{" not in out:
        row["error_tail"] = log.read_text()[-1500:]
        return row
    rec = json.loads(out[out.index("{"):])
    tm, diag = rec["timing"], rec["allocation"]["diagnostics"]
    alloc_s = tm.get("allocation_seconds") or 0.0
    split = {"load": tm["load_seconds"], "statistics_or_game": alloc_s,
             "forwards_and_hessians": tm["prune_seconds"] - tm["mask_seconds"], "solve": tm["mask_seconds"],
             "evaluation": tm["eval_seconds"]}
    split["other_in_call"] = tm["total_seconds"] - sum(split.values())
    split["process"] = wall - tm["total_seconds"]
    parts = {k: tm[k] for k in ("startup_seconds", "load_import_seconds", "load_tokenizer_seconds",
                                "load_weights_seconds", "weights_hash_seconds", "calibration_seconds",
                                "prefetch_seconds", "prefetch_wait_seconds") if k in tm}
    if "startup_seconds" in tm:  # process = start-up (interpreter, torch, layerprune, arguments) + exit
        parts["exit_seconds"] = split["process"] - tm["startup_seconds"]
    row["parts_s"] = parts
    row.update(blocks=len(rec["per_block"]), split_s=split, ppl_wikitext2=rec["ppl"].get("wikitext2"),
               eval_windows=rec["ppl_details"].get("wikitext2", {}).get("windows"),
               achieved=rec["sparsity"]["achieved"], prune_peak_gpu_mb=rec.get("peak_mem_mb"),
               dense_stats_split=diag.get("dense_stats_split"),
               game={k: diag[k] for k in ("evaluations", "sv_seconds", "setup_seconds", "evals_per_second", "sv_samples")
                     if k in diag} or None,
               versions={k: rec["versions"].get(k) for k in ("torch", "transformers", "layerprune") if k in rec["versions"]})
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--make", help="write a model folder here and stop")
    ap.add_argument("--dims", default="llama2-7b", choices=tuple(DIMS))
    ap.add_argument("--tokenizer", default=str(ROOT / ".stage" / "smoltok"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", help="the model folder to prune")
    ap.add_argument("--cases", default="wanda:dlp,sparsegpt:dlp")
    ap.add_argument("--extra", default="", help="more prune options for every case, one string")
    ap.add_argument("--timeout", type=float, default=580)
    ap.add_argument("--cwd", default=str(ROOT),
                    help="run `python -m layerprune.cli` from this folder (another checkout, for a side-by-side run)")
    ap.add_argument("--tag", default="", help="suffix of the cases' log files")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.make:
        print(json.dumps(make(a.make, a.dims, a.tokenizer, a.dtype, a.device)), flush=True)
        return
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"model_dir": a.model, "dims": a.dims, "cases": []}
    if out.is_file():
        res = json.loads(out.read_text())
    for case in [c for c in a.cases.split(",") if c]:
        pruner, allocation = case.split(":")
        row = run_case(a.model, a.dims, pruner, allocation, a.extra.split(), a.timeout, out.parent, a.device,
                       Path(a.cwd).resolve(), a.tag)
        print(json.dumps({k: v for k, v in row.items() if k != "error_tail"}), flush=True)
        if "error_tail" in row:
            print(row["error_tail"], file=sys.stderr)
        res["cases"].append(row)
        out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
