"""The JSON record of a run: configuration, versions, per-layer results, timings, evaluation."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import subprocess
from pathlib import Path

import torch


def versions() -> dict:
    """Library versions from the installed distributions' metadata (importing lm-eval or peft only to read
    ``__version__`` cost ≈ 5 s per run), the git hash, and the accelerator's name."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod, dist in (("transformers", "transformers"), ("accelerate", "accelerate"), ("safetensors", "safetensors"),
                      ("lm_eval", "lm_eval"), ("peft", "peft"), ("gguf", "gguf"), ("triton", "triton")):
        try:
            out[mod] = md.version(dist)
        except md.PackageNotFoundError:  # optional packages
            pass
    from layerprune import __version__

    out["layerprune"] = __version__
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        out["git"] = None
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name(0)
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def args_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_hash(model: torch.nn.Module) -> str:
    """A fingerprint of every parameter (name, shape, and a strided sample of its values)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        flat = p.detach().flatten()
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def run_record(config: dict, model: torch.nn.Module, device: str, alloc, res, ppl: dict, dense_ppl: dict, zs: dict,
               quant: dict | None, ppl_before_quant: dict, timing: dict, uses_data: bool) -> dict:
    """The run record (README, "Run record") from the pieces of one prune: configuration, versions,
    allocation with its diagnostics, per-linear and per-block results, timings, evaluation, size."""
    rec: dict = {"config": config, "versions": versions(), "started": timing.get("started") or now(),
                 "device": device, "model": config["model"]}
    if dense_ppl:
        rec["dense_ppl"] = {k: v["ppl"] for k, v in dense_ppl.items()}
    per_sec = res.calib_tokens * res.block_forwards / max(res.seconds, 1e-9) if uses_data else None
    rec.update({
        "sparsity": {"target": config["sparsity"], "achieved": res.achieved(), "pattern": config["pattern"]},
        "per_block": alloc.per_block,
        "per_block_achieved": [b["achieved"] for b in res.per_block],
        "allocation": {"method": alloc.method, "options": config["alloc_options"], "diagnostics": alloc.diagnostics,
                       "nm": alloc.nm, "m": alloc.m},
        "per_linear": res.per_linear,
        "blocks": res.per_block,
        "ppl": {k: v["ppl"] for k, v in ppl.items()},
        "ppl_details": ppl,
        "tasks": zs.get("tasks", {}),
        "timing": {"prune_seconds": res.seconds, "mask_seconds": sum(b["prune_seconds"] for b in res.per_block),
                   "calib_tokens": res.calib_tokens, "block_forwards": res.block_forwards,
                   "calib_tokens_per_second": per_sec, "allocation_seconds": alloc.diagnostics.get("seconds"),
                   **{k: v for k, v in timing.items() if k != "started"}},
        "peak_mem_mb": res.peak_mem_mb,
        "size": _size(res.per_linear, model),
        "finished": now(),
    })
    if quant is not None:
        rec["quantization"] = quant
        rec["size"] = quant["size"]
        if ppl_before_quant:
            rec["ppl_before_quantization"] = {k: v["ppl"] for k, v in ppl_before_quant.items()}
    if zs:
        rec["zero_shot"] = {k: v for k, v in zs.items() if k != "tasks"}
    return rec


def _size(per_linear: dict, model: torch.nn.Module) -> dict:
    """Bitmask + values bytes of the pruned linears against dense, from the per-linear zero counts."""
    el = torch.tensor([], dtype=next((p.dtype for p in model.parameters() if p.is_floating_point()),
                                     torch.float32)).element_size()
    dense = sum(v["numel"] for v in per_linear.values()) * el
    sparse = sum(v["numel"] / 8 + (v["numel"] - v["zeros"]) * el for v in per_linear.values())
    return {"dense_bytes": int(dense), "bitmask_bytes": int(sparse), "ratio": sparse / max(dense, 1)}
