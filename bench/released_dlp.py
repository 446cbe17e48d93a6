"""Side by side with the released DLP code (ironartisan/DLP, Apache-2.0): the same model folder, the same local
data, the same settings, one process per side, whole-process wall time measured by `bench/released_dlp.sh`.

The released code is not part of this repository: pass a checkout with ``--dlp-repo`` (``fetch`` it, carry it
to the device as an ignored folder). It runs unmodified except for what this machine and transformers 5 need,
applied at run time by this script, not by editing its files:

* ``datasets.load_dataset`` (no network) → the local copies: C4 "train" = ``c4_calib``, C4 "validation" =
  ``c4_eval``, WikiText-2 "train" = the local **validation** split (no train split is stored; the released
  evaluation tokenizes the 2 M-token train text only to discard it, so this makes its run shorter, not longer),
  WikiText-2 "test" = test;
* transformers 5 decoder layers need ``position_embeddings`` (cos, sin), which the released per-layer calls do
  not pass: a wrapper computes them from the model's own rotary module and the ``position_ids`` they pass;
* the tokenizer is loaded fast (``use_fast=True``; the released script asks for the slow one, which only
  makes its data loading slower).

    python3 bench/released_dlp.py --make-model llama2-7b --tokenizer TOKDIR --model-dir /root/m7b --device cuda
    python3 bench/released_dlp.py --side released --method wanda_dlp --model-dir /root/m7b --dlp-repo .stage/DLP
    python3 bench/released_dlp.py --side layerprune --method wanda_dlp --model-dir /root/m7b
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DIMS = {"llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, max_position_embeddings=4096),
        "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=4096)}


def make_model(dims: str, tokenizer: str, out: str, device: str, blocks: int | None) -> None:
    """A LLaMA with ``dims`` and random fp16 weights, and the given tokenizer (its vocabulary size)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer)
    kw = dict(DIMS[dims])
    if blocks:
        kw["num_hidden_layers"] = blocks
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **kw)
    torch.manual_seed(0)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    m.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    print(json.dumps({"model_dir": out, "params": sum(p.numel() for p in m.parameters()), "vocab": len(tok)}))


class _Split:
    """The part of a ``datasets.Dataset`` the released loaders use: len, row, slice of rows, a column."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i):
        if isinstance(i, str):
            return self.texts
        if isinstance(i, slice):
            return {"text": self.texts[i]}
        return {"text": self.texts[i]}


def _local_load_dataset(name, *args, split=None, data_files=None, **kw):
    from layerprune.data.sources import load_documents

    if "wikitext" in name:
        return _Split(load_documents("wikitext2", "test" if split == "test" else "validation"))
    if "c4" in name:
        return _Split(load_documents("c4", "calib" if split == "train" else "eval"))
    raise SystemExit(f"the released code asked for {name}, which is not stored here")


def _patch_rope(model) -> None:
    """transformers 5: fill ``position_embeddings`` from the model's rotary module when a caller (the released
    per-layer loops) passes only ``position_ids``."""
    layer_cls = type(model.model.layers[0])
    rotary = model.model.rotary_emb
    orig = layer_cls.forward

    def forward(self, hidden_states, *a, position_embeddings=None, position_ids=None, **k):
        if position_embeddings is None:
            if position_ids is None:
                position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
            position_embeddings = rotary(hidden_states, position_ids)
        return orig(self, hidden_states, *a, position_embeddings=position_embeddings, position_ids=position_ids, **k)

    layer_cls.forward = forward


def released(a) -> dict:
    import types

    sys.path.insert(0, str(Path(a.dlp_repo).resolve()))
    # the device has no `datasets` package and no network: the released loaders get the local copies
    sys.modules["datasets"] = types.SimpleNamespace(load_dataset=_local_load_dataset, load_from_disk=None)
    import lib.data as D  # the released code

    D.load_dataset = _local_load_dataset
    from lib.eval import eval_ppl
    from lib.prune import get_dlp_ratios, prune_sparsegpt, prune_sparsegpt_dlp, prune_wanda, prune_wanda_dlp
    from lib.utils import check_sparsity
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(a.device if a.device != "cuda" else "cuda:0")
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float16, low_cpu_mem_usage=True,
                                                 device_map="auto" if dev.type == "cuda" else "cpu")
    model.seqlen = 2048
    model.eval()
    if not hasattr(model, "hf_device_map"):  # set by device_map="auto"; a CPU load has none, the released code reads it
        model.hf_device_map = {"": str(dev)}
    tok = AutoTokenizer.from_pretrained(a.model_dir, use_fast=True)
    _patch_rope(model)
    load_s = time.perf_counter() - t
    # the released code picks its LLaMA code paths by the substring "llama" in --model; the folder is a LLaMA
    args = argparse.Namespace(model=str(Path(a.model_dir).resolve()) + "-llama", seed=0, nsamples=a.nsamples,
                              sparsity_ratio=a.sparsity, sparsity_type="unstructured", use_variant=False,
                              alpha=a.alpha, strategy="median", Lamda=0.08, Hyper_m=5, wbits=16)
    np_seed(0)
    t = time.perf_counter()
    ratios = get_dlp_ratios(args, model, tok, dev) if a.method.endswith("_dlp") else None
    stats_s = time.perf_counter() - t
    t = time.perf_counter()
    {"wanda_dlp": lambda: prune_wanda_dlp(args, model, tok, dev, ratios),
     "sparsegpt_dlp": lambda: prune_sparsegpt_dlp(args, model, tok, dev, ratios),
     "wanda": lambda: prune_wanda(args, model, tok, dev),
     "sparsegpt": lambda: prune_sparsegpt(args, model, tok, dev)}[a.method]()
    prune_s = time.perf_counter() - t
    achieved = float(check_sparsity(model))
    t = time.perf_counter()
    ppl = float(eval_ppl(model, tok, dev, dataset="wikitext2"))
    eval_s = time.perf_counter() - t
    return {"side": "released", "load_s": load_s, "ratios_s": stats_s, "prune_s": prune_s, "eval_s": eval_s,
            "achieved": achieved, "ppl_wikitext2": ppl, "per_block_density": ratios}


def np_seed(s: int) -> None:
    import numpy as np

    np.random.seed(s)
    torch.random.manual_seed(s)


def ours(a) -> dict:
    import subprocess

    pruner, _, alloc = a.method.partition("_")
    cmd = [sys.executable, "-m", "layerprune.cli", "prune", a.model_dir, "--pruner", pruner,
           "--allocation", alloc or "uniform", "--sparsity", str(a.sparsity), "--nsamples", str(a.nsamples),
           "--seqlen", "2048", "--dtype", a.lp_dtype, "--device", a.device, "--eval", "wikitext2", "--json", "--quiet"]
    if a.eval_windows:
        cmd += ["--eval-max-windows", str(a.eval_windows)]
    if alloc == "dlp":
        cmd += ["--alpha", str(a.alpha), "--stat", "mean"]  # the released ratios use the mean of the scores
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    process_s = time.perf_counter() - t  # the CLI's own process, start to exit: without this wrapper's imports
    if p.returncode != 0:
        raise SystemExit(p.stderr[-2000:])
    rec = json.loads(p.stdout[p.stdout.index("{"):])
    return {"side": "layerprune", "process_wall_s": process_s, "timing": rec.get("timing"), "achieved": rec["sparsity"]["achieved"],
            "ppl_wikitext2": rec["ppl"]["wikitext2"], "per_block_density": [1 - x for x in rec["per_block"]],
            "dense_stats_split": (rec.get("allocation") or {}).get("diagnostics", {}).get("dense_stats_split")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=("released", "layerprune"))
    ap.add_argument("--method", default="wanda_dlp", choices=("wanda_dlp", "sparsegpt_dlp", "wanda", "sparsegpt"))
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--dlp-repo", default=str(ROOT / ".stage" / "DLP"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--alpha", type=float, default=0.15)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--make-model", choices=tuple(DIMS))
    ap.add_argument("--blocks", type=int, default=0)
    ap.add_argument("--tokenizer", help="with --make-model: a directory holding the tokenizer to use")
    ap.add_argument("--eval-windows", type=int, default=0, help="layerprune side: evaluate only N windows (a smoke test)")
    ap.add_argument("--lp-dtype", default="float16", help="layerprune side: --dtype (float16, as the released side)")
    ap.add_argument("--out", help="write the result as JSON here")
    a = ap.parse_args()
    if a.make_model:
        make_model(a.make_model, a.tokenizer, a.model_dir, a.device, a.blocks or None)
        return
    res = released(a) if a.side == "released" else ours(a)
    res.update(method=a.method, sparsity=a.sparsity, nsamples=a.nsamples, device=a.device,
               in_process_s=time.perf_counter() - T0, torch=torch.__version__)
    print(json.dumps({k: v for k, v in res.items() if k != "per_block_density"}))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
