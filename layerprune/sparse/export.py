"""Export a pruned output directory to the compressed format, and load it back as ``SparseLinear`` layers.

A sparse directory holds ``model.safetensors`` (each packed linear as its layout's tensors, e.g.
``<name>.values`` / ``.deltas`` / ``.starts`` / ``.gptr`` for ``delta``, next to every other tensor),
``sparse_config.json`` (format, layout, and per-linear layout, shape, sparsity and bytes), ``config.json``,
the tokenizer and ``layerprune.json`` (the run record). A linear below ``min_sparsity`` stays a dense
``nn.Linear``: its packed form would not be faster (the break-even is measured per layout on the H200,
BENCHMARKS.md "Sparse inference"). With ``--layout nm24`` the 2:4 linears take the nm24 layout and the others
(not 2:4, or N not a multiple of 16 or K of 32) the delta layout; each linear's entry names its layout. Directories
written before the delta layout (``layerprune-sparse-v1``) load as ``bitmask``.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from layerprune.errors import UserError
from layerprune.export import RECORD, RunDir, check_out_dir, is_layerprune_dir
from layerprune.models.adapter import ModelAdapter
from layerprune.record import args_hash, now
from layerprune.sparse import delta, nm24
from layerprune.sparse.format import BK, BN, SparseTensor, bytes_per_weight, validate
from layerprune.sparse.linear import BUFFERS, LAYOUTS, SparseLinear

log = logging.getLogger("layerprune")

FORMAT = "layerprune-sparse-v2"
FORMATS_READ = ("layerprune-sparse-v1", FORMAT)  # v1: bitmask only, no "layout" key
SPARSE_CONFIG = "sparse_config.json"
# below these sparsities a packed bf16 linear is slower than dense F.linear for one decode token on the
# H200 (BENCHMARKS.md "Sparse inference": bench/sparse_decode.py's break-even rows): such layers stay
# dense. bitmask: break-even 0.68–0.71 over the 7B/8B/70B shapes; delta: 0.98–0.99× at 50%, 1.04–1.09× at
# 55%. A layer pruned to s holds floor(s·n) zeros per row, just under s: hence 0.695 and 0.545
# nm24: a 2:4 weight is 50% sparse, and faster than dense from one to 16 tokens on 7B/8B/70B shapes (1.1-1.7× at one
# token, BENCHMARKS.md "Session 27")
MIN_SPARSITY = {"bitmask": 0.695, "delta": 0.545, "nm24": 0.5}
# bf16 delta linears with more than 2048 rows run the one-token CUDA kernel (delta_cuda) where it is
# available: faster than dense from below 30% on the 7B/70B shapes (1.04–1.20× at 30%, 1.12–1.28× at 35%,
# BENCHMARKS.md "Session 14"); 0.345 leaves a margin
MIN_SPARSITY_CUDA = 0.345
AUTO = "auto"


def default_min_sparsity(layout: str, w: torch.Tensor) -> float:
    """The sparsity from which a packed ``w`` is faster than dense for one decode token on the H200."""
    if layout == "delta" and w.dtype == torch.bfloat16 and w.shape[0] > 2048:
        return MIN_SPARSITY_CUDA
    return MIN_SPARSITY[layout]


def is_sparse_dir(path: str | Path) -> bool:
    return (Path(path) / SPARSE_CONFIG).is_file()


def check_sparse_out(out: str | Path, pruned_out: str | Path | None) -> None:
    if pruned_out is None:
        raise UserError("--sparse-out needs --out too: the sparse model is exported from the saved pruned model")
    check_out_dir(out)


def _set_module(model: nn.Module, name: str, mod: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, mod)


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise UserError(f"--layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
    return layout


def sparsify(model: nn.Module, min_sparsity: float | None = None, layout: str = "delta",
             pack_device: torch.device | str | None = None, progress: bool = False) -> dict[str, dict]:
    """Replace every block linear at or above ``min_sparsity`` (default: the measured break-even of its
    layout, dtype and shape, :func:`default_min_sparsity`) by a :class:`SparseLinear` in ``layout`` (in place;
    packed on ``pack_device`` when given, the buffers left where the weight was)."""
    from tqdm.auto import tqdm

    check_layout(layout)
    ad = ModelAdapter.of(model)
    layers = {}
    not_nm = []
    for i, n, lin in tqdm(ad.all_linears(), desc="pack", unit="linear", disable=not progress):
        name = ad.full_name(i, n)
        w = lin.weight.data
        lay = "delta" if layout == "nm24" and not nm24.fits(w) else layout  # the 2:4 check, once per weight
        ms = default_min_sparsity(lay, w) if min_sparsity is None else min_sparsity
        s = float((w == 0).sum()) / w.numel()
        if lay != layout and s >= ms:
            not_nm.append(name)
        too_wide = lay == "delta" and w.shape[1] >= delta.MAX_K
        if too_wide and s >= ms:
            log.warning("%s: %d input features do not fit the delta layout's 16-bit group starts: kept dense "
                        "(--layout bitmask packs it)", name, w.shape[1])
        if s >= ms and not too_wide:
            sl = SparseLinear.from_linear(lin, lay, pack_device)
            _set_module(model, name, sl)
            layers[name] = {"format": "sparse", "layout": lay, "sparsity": s, "min_sparsity": ms,
                            "shape": list(w.shape), "bytes": sl.packed().nbytes(),
                            "dense_bytes": w.numel() * w.element_size()}
        else:
            layers[name] = {"format": "dense", "sparsity": s, "min_sparsity": ms, "shape": list(w.shape),
                            "bytes": w.numel() * w.element_size(), "dense_bytes": w.numel() * w.element_size()}
    if not_nm:
        log.warning("%d linear(s) are not 2:4 (or their sizes are not multiples of 16 × 32): packed in the delta "
                    "layout (%s%s)", len(not_nm), ", ".join(not_nm[:3]), ", …" if len(not_nm) > 3 else "")
    return layers


def checksum(tensors) -> str:
    """CRC-32 of a packed linear's buffers (in their layout's order, ``BUFFERS``): structural checks cannot
    see a corruption that keeps every count consistent, this can."""
    crc = 0
    for t in tensors:
        crc = zlib.crc32(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes(), crc)
    return f"{crc:08x}"


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer once (tied weights keep their first name)."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else (k,)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().cpu().contiguous()
    return out


def export_sparse(pruned_dir: str | Path, out: str | Path, min_sparsity: float | None = None,
                  progress: bool = True, layout: str = "delta", device: str | torch.device = "auto") -> dict:
    """Write ``pruned_dir`` (a ``prune --out`` directory) in the compressed format to ``out`` (atomic). The model
    is read to the CPU; each linear is packed on ``device`` (``auto``: a GPU when there is one: seconds for a
    7B model, where the CPU takes minutes) and its packed buffers come back to the CPU to be written."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from layerprune.utils import resolve_device

    if not Path(pruned_dir).is_dir() or not is_layerprune_dir(pruned_dir):
        raise UserError(f"{pruned_dir} is not a layerprune output directory (no {RECORD} and config.json): "
                        "run `layerprune prune ... --out DIR` first")
    check_layout(layout)
    if min_sparsity is not None and not (0 <= min_sparsity <= 1):
        raise UserError(f"--min-sparsity must be in [0, 1] (got {min_sparsity})")
    ms = AUTO if min_sparsity is None else min_sparsity  # as recorded; "auto": each linear's default
    check_out_dir(out)
    dev = resolve_device(device)
    rec0 = json.loads((Path(pruned_dir) / RECORD).read_text())
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(pruned_dir), dtype="auto").eval()
        tok = AutoTokenizer.from_pretrained(str(pruned_dir))
    except (OSError, ValueError) as e:
        raise UserError(f"{pruned_dir} does not hold a model transformers can load: {str(e).splitlines()[0][:120]}") from None
    t1 = time.perf_counter()
    layers = sparsify(model, min_sparsity, layout, pack_device=dev, progress=progress)
    t2 = time.perf_counter()
    for name, info_l in layers.items():
        if info_l["format"] == "sparse":
            sl = model.get_submodule(name)
            info_l["crc32"] = checksum(getattr(sl, b) for b in BUFFERS[sl.layout])
    n_sparse = sum(v["format"] == "sparse" for v in layers.values())
    if n_sparse == 0:
        log.warning("no linear reaches --min-sparsity (%s): every layer stays dense", ms)
    dense_b = sum(v["dense_bytes"] for v in layers.values())
    sparse_b = sum(v["bytes"] for v in layers.values())
    cfg = {"format": FORMAT, "layout": layout, "min_sparsity": ms, "dtype": str(model.dtype).replace("torch.", ""),
           "layers": layers, **({"bn": BN, "bk": BK} if layout == "bitmask" else {"group": delta.GROUP})}
    info = {"out": str(out), "source": str(pruned_dir), "exported": now(), "layers": layers, "sparse_layers": n_sparse,
            "min_sparsity": ms, "layout": layout, "size": {"dense_bytes": dense_b, "sparse_bytes": sparse_b,
                                                           "ratio": sparse_b / max(dense_b, 1)},
            **({"bytes_per_weight_2:4": nm24.bytes_per_weight(model.dtype.itemsize)} if layout == "nm24" else
               {"bytes_per_weight_at_0.7": (bytes_per_weight(0.7, model.dtype.itemsize) if layout == "bitmask"
                                            else delta.bytes_per_weight(0.7, model.dtype.itemsize))}),
            "pack_device": str(dev), "timing": {"load_s": t1 - t0, "pack_s": t2 - t1}}

    def write(m: nn.Module, tokenizer: Any, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        save_file(_state_dict(m), str(path / "model.safetensors"), metadata={"format": "pt", "layerprune": FORMAT})
        cfg_m = m.config
        if getattr(cfg_m, "quantization_config", None) is not None and "gguf" in str(cfg_m.quantization_config).lower():
            del cfg_m.quantization_config
        cfg_m.save_pretrained(path)
        (path / SPARSE_CONFIG).write_text(json.dumps(cfg, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    rd = RunDir(out, args_hash({"src": str(Path(pruned_dir).resolve()), "ms": ms, "layout": layout}))
    t3 = time.perf_counter()
    info["timing"]["checksum_s"] = t3 - t2
    try:
        rd.finalize(model, tok, {**rec0, "sparse_export": {k: v for k, v in info.items() if k != "layers"}}, writer=write)
    except BaseException:
        rd.abandon()
        raise
    info["timing"]["write_s"] = time.perf_counter() - t3
    return info


def load_sparse(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                merge: bool = False) -> nn.Module:
    """A Hugging Face causal LM whose packed linears are :class:`SparseLinear`; every packed linear is
    checked (``validate`` of its layout) before the model is returned. ``merge``: run the linears that read one
    input (q/k/v, gate/up) as one stacked linear (:func:`layerprune.sparse.merge.merge_siblings`: faster decode;
    the module tree then holds ``MergedPart`` modules where those linears were)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not is_sparse_dir(path):
        raise UserError(f"{path} is not a sparse layerprune directory (no {SPARSE_CONFIG}): "
                        "run `layerprune export DIR --format sparse --out SDIR` first")
    try:
        cfg = json.loads((path / SPARSE_CONFIG).read_text())
        sd = load_file(str(path / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - a truncated file fails inside safetensors
        raise UserError(f"{path} is damaged ({type(e).__name__}): export it again") from None
    if cfg.get("format") not in FORMATS_READ:
        raise UserError(f"{path}: unknown sparse format {cfg.get('format')!r} (this layerprune reads "
                        f"{', '.join(FORMATS_READ)})")
    layout = cfg.get("layout", "bitmask")
    if layout not in LAYOUTS:
        raise UserError(f"{path}: unknown sparse layout {layout!r}: the checkpoint is damaged or newer than this layerprune")
    dt = dtype or getattr(torch, cfg.get("dtype", "float32"))
    config = AutoConfig.from_pretrained(str(path))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    for name, info in cfg["layers"].items():
        if info["format"] != "sparse":
            continue
        lin = model.get_submodule(name)
        lay = info.get("layout", layout)
        if lay not in LAYOUTS:
            raise UserError(f"{path}: unknown sparse layout {lay!r} for {name}: the checkpoint is damaged or newer "
                            "than this layerprune")
        _set_module(model, name, SparseLinear(lin.in_features, lin.out_features, lin.bias is not None,
                                              dtype=dt, device=device, layout=lay))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{path} does not match its config ({len(missing)} tensors missing, {len(unexpected)} "
                        "unexpected): export it again")
    model.tie_weights()
    for name, info in cfg["layers"].items():
        if info["format"] == "sparse":
            sl = model.get_submodule(name)
            # from the file's tensors, still on the CPU (no copy back from the device)
            if "crc32" in info and checksum(sd[f"{name}.{b}"] for b in BUFFERS[sl.layout]) != info["crc32"]:
                raise UserError(f"sparse tensor {name}: checksum mismatch (a corrupted checkpoint): export it again")
            sp = sl.packed()
            {nm24.NM24Tensor: nm24.validate, delta.DeltaTensor: delta.validate}.get(type(sp), validate)(sp, name)
            sl.values.data = sl.values.data.to(dt)
    model.to(device).eval()
    model.config.use_cache = True
    model.layerprune_source = str(path)  # type: ignore[attr-defined]
    if merge:
        from layerprune.sparse.merge import merge_siblings

        merge_siblings(model)
    return model


def densify(model: nn.Module) -> nn.Module:
    """Turn every :class:`SparseLinear` back into ``nn.Linear`` with zeros (the dense-with-zeros twin)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, SparseLinear):
            w = mod.dense_weight()
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device=w.device, dtype=w.dtype)
            lin.weight.data = w
            if mod.bias is not None:
                lin.bias.data = mod.bias.data.clone()
            _set_module(model, name, lin)
    return model


__all__ = ["SparseTensor", "densify", "export_sparse", "is_sparse_dir", "load_sparse", "sparsify"]
