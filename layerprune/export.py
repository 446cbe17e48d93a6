"""Writing results: the output directory (atomic, resumable) and the HF export of a pruned model.

A run with ``--out DIR`` works in ``.DIR.partial`` next to it: finished blocks are checkpointed
there (``blocks/block_<i>.safetensors`` + records) under a hash of the run's arguments; a rerun with
the same arguments continues from the last finished block. The final model (safetensors, config,
tokenizer) and ``layerprune.json`` are written into the partial directory, which is renamed to DIR
only when complete, so an interrupted run never leaves a model that looks finished.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from layerprune.errors import UserError
from layerprune.utils import write_atomic

log = logging.getLogger("layerprune")

RECORD = "layerprune.json"


def check_out_dir(out: str | Path) -> Path:
    """``out`` must not exist, or be empty: never overwrite anything."""
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty: choose a new directory or remove it")
    return p


class RunDir:
    """Resumable, atomic output directory (implements the engine's checkpoint protocol)."""

    def __init__(self, out: str | Path, args_hash: str) -> None:
        self.out = check_out_dir(out)
        self.partial = self.out.parent / f".{self.out.name}.partial"
        self.args_hash = args_hash
        self.done = 0
        state = self.partial / "progress.json"
        if state.is_file():
            st = json.loads(state.read_text())
            if st.get("args_hash") == args_hash:
                self.done = int(st.get("done", 0))
                log.info("resuming %s: %d blocks already pruned", self.out, self.done)
            else:
                log.info("found a partial run with other arguments in %s; starting afresh", self.partial)
                shutil.rmtree(self.partial)
        (self.partial / "blocks").mkdir(parents=True, exist_ok=True)
        self._write_state()

    def _write_state(self) -> None:
        write_atomic(self.partial / "progress.json", json.dumps({"args_hash": self.args_hash, "done": self.done}))

    def save_block(self, i: int, block: nn.Module, record: dict) -> None:
        sd = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        save_file(sd, str(self.partial / "blocks" / f"block_{i}.safetensors"))
        (self.partial / "blocks" / f"block_{i}.json").write_text(json.dumps(record))
        self.done = i + 1
        self._write_state()

    def load_block(self, i: int, block: nn.Module) -> dict:
        sd = load_file(str(self.partial / "blocks" / f"block_{i}.safetensors"))
        dev = next(block.parameters()).device
        block.load_state_dict({k: v.to(dev) for k, v in sd.items()})
        return json.loads((self.partial / "blocks" / f"block_{i}.json").read_text())

    def finalize(self, model: nn.Module, tokenizer, record: dict, extra_files: dict[str, bytes] | None = None,
                 before_rename=None) -> Path:
        final = self.partial / "model"
        if final.exists():
            shutil.rmtree(final)
        save_model(model, tokenizer, final)
        (final / RECORD).write_text(json.dumps(record, indent=2, default=str))
        for name, data in (extra_files or {}).items():
            (final / name).write_bytes(data)
        if before_rename is not None:
            before_rename(final)
        if self.out.exists():
            self.out.rmdir()  # empty (checked at start)
        final.rename(self.out)
        shutil.rmtree(self.partial, ignore_errors=True)
        return self.out


def save_model(model: nn.Module, tokenizer, path: str | Path) -> None:
    """Plain HF safetensors with zeros kept (loads with ``AutoModelForCausalLM.from_pretrained``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.to("cpu")
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and "gguf" in str(qc).lower():  # dequantised GGUF: plain weights, drop the marker
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def sparse_size_bytes(model: nn.Module, linear_names: list[str], bits: int | None = None,
                      group_size: int | None = None) -> dict:
    """On-disk size estimate of the pruned linears as a bitmask + values (fp values, or ``bits``-bit
    integers plus an fp16 scale and an int8 zero point per group of ``group_size`` inputs) vs dense."""
    mods = dict(model.named_modules())
    dense = sparse = 0.0
    for n in linear_names:
        w = mods[n].weight
        rows, cols = w.shape
        dense += w.numel() * w.element_size()
        nnz = int((w != 0).sum())
        sparse += w.numel() / 8 + nnz * ((bits / 8) if bits else w.element_size())
        if bits:
            sparse += rows * -(-cols // (group_size or cols)) * 3
    return {"dense_bytes": int(dense), "bitmask_bytes": int(sparse), "ratio": sparse / max(dense, 1)}


def is_layerprune_dir(path: str | Path) -> bool:
    return (Path(path) / RECORD).is_file() and (Path(path) / "config.json").is_file()


def load_record(path: str | Path) -> dict:
    if not is_layerprune_dir(path):
        raise UserError(f"{path} is not a layerprune output directory (no {RECORD}): run `layerprune prune ... --out DIR` first")
    return json.loads((Path(path) / RECORD).read_text())


def torch_dtype_name(t: torch.dtype) -> str:
    return str(t).replace("torch.", "")
