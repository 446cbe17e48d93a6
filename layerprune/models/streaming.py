"""Models larger than host memory: the skeleton is built without weights, and each decoder block's weights
are read from the safetensors shards only while the engine works on that block.

``open_streamed(dir)`` builds the model with ``accelerate.init_empty_weights`` (parameters on the meta
device, buffers real), reads every tensor outside the blocks (embeddings, final norm, head), and returns a
:class:`BlockWeights` that the engine calls: ``load(i, block)`` before block ``i`` runs, ``release(i, block)``
after its pruned weights are checkpointed. Peak host memory is then the non-block tensors, a block or two,
and the calibration activations.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from layerprune.errors import UserError


class BlockWeights:
    """Where each tensor of a local safetensors checkpoint lives, and block-by-block (un)loading."""

    def __init__(self, directory: str | Path, blocks_name: str, dtype: torch.dtype) -> None:
        self.dir = Path(directory)
        self.blocks_name = blocks_name
        self.dtype = dtype
        idx = self.dir / "model.safetensors.index.json"
        if idx.is_file():
            self.where = {k: self.dir / f for k, f in json.loads(idx.read_text())["weight_map"].items()}
        elif (self.dir / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(self.dir / "model.safetensors"), framework="pt") as fh:
                self.where = {k: self.dir / "model.safetensors" for k in fh.keys()}
        else:
            raise UserError(f"--stream needs a local safetensors checkpoint; {self.dir} has none")
        self.loaded: set[int] = set()
        self.max_loaded = 0

    def fingerprint(self) -> str:
        """Identifies the checkpoint without reading it (file names, sizes, modification times)."""
        import hashlib

        h = hashlib.sha256()
        for f in sorted(set(self.where.values())):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        out = {}
        for f, ks in by_file.items():
            with safe_open(str(f), framework="pt") as fh:
                for k in ks:
                    out[k] = fh.get_tensor(k).to(self.dtype)
        return out

    def load(self, i: int, block: nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Give block ``i`` its weights: from the source shards, or from ``tensors`` (keys relative to the block,
        e.g. its pruned checkpoint)."""
        from accelerate.utils import set_module_tensor_to_device

        prefix = f"{self.blocks_name}.{i}."
        names = [n for n, _ in block.named_parameters()]
        if tensors is None:
            tensors = {k[len(prefix):]: v for k, v in self.read([prefix + n for n in names]).items()}
        for n in names:
            set_module_tensor_to_device(block, n, "cpu", value=tensors[n].to(self.dtype))
        self.loaded.add(i)
        self.max_loaded = max(self.max_loaded, len(self.loaded))

    def release(self, i: int, block: nn.Module) -> None:
        block.to("meta")
        self.loaded.discard(i)


def open_streamed(directory: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """``(model, tokenizer, BlockWeights)``: every tensor outside the decoder blocks loaded, blocks empty."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from layerprune.models.adapter import ModelAdapter

    d = Path(directory)
    if not (d / "config.json").is_file():
        raise UserError(f"--stream reads a local Hugging Face directory with safetensors; {d} is not one")
    config = AutoConfig.from_pretrained(str(d), trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    model.config.use_cache = False
    ad = ModelAdapter.of(model)
    src = BlockWeights(d, ad.blocks_name, dtype)
    inside = {id(p) for b in ad.blocks for p in b.parameters()}
    rest = [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) not in inside]
    present = [n for n in rest if n in src.where]
    for n, t in src.read(present).items():
        set_module_tensor_to_device(model, n, "cpu", value=t)
    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if id(p) not in inside and p.device.type == "meta"]
    if missing:
        raise UserError(f"{d} lacks tensors outside the decoder blocks ({missing[:3]}): the checkpoint is incomplete")
    tok = AutoTokenizer.from_pretrained(str(d))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.layerprune_source = str(d)  # type: ignore[attr-defined]
    return model, tok, src


def write_from_checkpoints(model: nn.Module, tokenizer, path: Path, run_dir) -> None:
    """The final HF directory, shard by shard: the tensors outside the blocks, then one shard per block
    copied from its checkpoint (keys prefixed), with ``model.safetensors.index.json``. One block in memory."""
    from safetensors.torch import load_file, save_file

    from layerprune.models.adapter import ModelAdapter

    path.mkdir(parents=True, exist_ok=True)
    ad = ModelAdapter.of(model)
    prefix = ad.blocks_name + "."
    rest, seen = {}, set()
    for k, v in model.state_dict().items():
        if k.startswith(prefix) or v.device.type == "meta":
            continue
        key = (v.data_ptr(), tuple(v.shape))
        if key in seen:  # tied weights (lm_head = embeddings) are written once, as transformers does
            continue
        seen.add(key)
        rest[k] = v.detach().contiguous()
    weight_map, total = {}, 0
    save_file(rest, str(path / "model-rest.safetensors"), metadata={"format": "pt"})
    for k, v in rest.items():
        weight_map[k], total = "model-rest.safetensors", total + v.numel() * v.element_size()
    for i in range(ad.n_blocks):
        sd = {f"{prefix}{i}.{k}": v for k, v in load_file(str(run_dir.partial / "blocks" / f"block_{i}.safetensors")).items()}
        name = f"model-block-{i:05d}.safetensors"
        save_file(sd, str(path / name), metadata={"format": "pt"})
        for k, v in sd.items():
            weight_map[k], total = name, total + v.numel() * v.element_size()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=1))
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is not None and "gguf" in str(cfg.quantization_config).lower():
        del cfg.quantization_config
    cfg.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
