"""Host memory of ``prune --stream`` on blocks of LLaMA-2-70B size (CPU; no GPU needed).

    python3 bench/stream_rss.py --dir /tmp/s70 --blocks 8 --out bench/results/cpu/stream_rss_70b.json

Writes a safetensors checkpoint with LLaMA-2-70B dimensions (hidden 8192, MLP 28672, GQA 64/8 heads; random
bf16 weights, one shard per block, 1.71 GB each) and ``--blocks`` of its 80 blocks, with smollm2's tokenizer
(the vocabulary sized to it), then runs the command a user would —

    layerprune prune DIR --stream --dtype bfloat16 --pruner wanda --allocation dlp|uniform --sparsity 0.5 ...

— under ``/usr/bin/time -v`` and records its peak resident set size, wall time and the sizes on disk. A
streamed run holds the tensors outside the blocks, about two blocks and the calibration activations, so
the peak does not grow with the number of blocks: what 8 blocks need, 80 need (the table says so only
as that argument, the measured run is 8 blocks). The calibration and evaluation are tiny (the CPU would
take hours on 128 × 2048 tokens through 70B-sized bf16 blocks: 8 calibration tokens here); the weights read, pruned and written are real.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_checkpoint(d: Path, blocks: int) -> dict:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from layerprune.models.loading import ALIASES, alias_gguf, _gguf_to_dir  # noqa: F401

    tok_dir = _gguf_to_dir(alias_gguf(ALIASES["smollm2-135m"]))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    d.mkdir(parents=True, exist_ok=True)
    for f in Path(tok_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, d / f.name)
    H, F, nh, kv = 8192, 28672, 64, 8
    cfg = LlamaConfig(hidden_size=H, intermediate_size=F, num_hidden_layers=blocks, num_attention_heads=nh,
                      num_key_value_heads=kv, vocab_size=len(tok), max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg.torch_dtype = "bfloat16"
    cfg.save_pretrained(d)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map, total = {}, 0
    hd = H // nh
    for i in range(blocks):
        p = f"model.layers.{i}."
        t = {p + "self_attn.q_proj.weight": rnd(H, H), p + "self_attn.k_proj.weight": rnd(kv * hd, H),
             p + "self_attn.v_proj.weight": rnd(kv * hd, H), p + "self_attn.o_proj.weight": rnd(H, H),
             p + "mlp.gate_proj.weight": rnd(F, H), p + "mlp.up_proj.weight": rnd(F, H),
             p + "mlp.down_proj.weight": rnd(H, F),
             p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16)}
        name = f"model-{i:05d}.safetensors"
        save_file(t, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        total += sum(v.numel() * 2 for v in t.values())
        del t
    rest = {"model.embed_tokens.weight": rnd(len(tok), H), "model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
            "lm_head.weight": rnd(len(tok), H)}
    save_file(rest, str(d / "model-rest.safetensors"), metadata={"format": "pt"})
    weight_map.update({k: "model-rest.safetensors" for k in rest})
    total += sum(v.numel() * 2 for v in rest.values())
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}))
    return {"bytes": total, "block_bytes": (2 * H * H + 2 * kv * hd * H + 3 * F * H + 2 * H) * 2,
            "rest_bytes": sum(v.numel() * 2 for v in rest.values())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reuse", action="store_true", help="reuse a checkpoint this script wrote before")
    ap.add_argument("--allocation", default="dlp", help="uniform | dlp | owl | svnup (what --stream supports)")
    ap.add_argument("--sv-args", default="--window 2 --sv-samples 1 --sv-seqlen 8",
                    help="the SV-NUP game's options with --allocation svnup (a tiny SV set: the CPU is the slow part)")
    a = ap.parse_args()
    d = Path(a.dir)
    t = time.perf_counter()
    if (d / "model" / "model.safetensors.index.json").is_file() and a.reuse:
        sizes = json.loads((d / "model" / "sizes.json").read_text())
    else:
        sizes = write_checkpoint(d / "model", a.blocks)
        (d / "model" / "sizes.json").write_text(json.dumps(sizes))
    write_s = time.perf_counter() - t
    out_dir = d / "pruned"
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = ["layerprune", "prune", str(d / "model"), "--stream", "--dtype", "bfloat16", "--pruner", "wanda",
           "--allocation", a.allocation, "--sparsity", "0.5", "--nsamples", "1", "--seqlen", "8", "--eval", "wikitext2",
           "--eval-seqlen", "8", "--eval-max-windows", "1", "--device", "cpu", "--out", str(out_dir), "--json",
           "--quiet"]
    if a.allocation == "svnup":
        cmd += a.sv_args.split()
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"stream run failed:\n{r.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    rec = json.loads(r.stdout)
    out = {"blocks": a.blocks, "dims": "llama2-70b", "allocation": a.allocation, "dtype": "bfloat16", "checkpoint_bytes": sizes["bytes"],
           "block_bytes": sizes["block_bytes"], "non_block_bytes": sizes["rest_bytes"],
           "peak_rss_mb": rss_kb / 1024, "wall_s": wall, "write_checkpoint_s": write_s, "command": " ".join(cmd),
           "achieved": rec["sparsity"]["achieved"], "timing": rec["timing"],
           "allocation_seconds": rec["allocation"]["diagnostics"].get("seconds"),
           "sv_evaluations": rec["allocation"]["diagnostics"].get("evaluations"),
           "sv_seconds": rec["allocation"]["diagnostics"].get("sv_seconds"),
           "sv_block_reads": rec["allocation"]["diagnostics"].get("block_reads"),
           "output_bytes": sum(f.stat().st_size for f in out_dir.glob("*.safetensors")),
           "torch": torch.__version__, "cpu_count": os.cpu_count()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
