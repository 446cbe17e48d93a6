"""The one way through layerprune: load → calibrate → allocate → prune → evaluate → export."""

from __future__ import annotations

import inspect
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from layerprune.allocation import AllocContext, Allocation, get_allocator, mixed_nm
from layerprune.allocation.common import expand_blocks
from layerprune.data.calibration import CalibSet, sample_c4_windows, token_windows
from layerprune.data.sources import SOURCES, calib_split, load_documents
from layerprune.distributed import active, init_from_env, is_main, world_size
from layerprune.engine.sequential import DenseStats, dense_stats_pass, prune_sequential
from layerprune.errors import UserError, require
from layerprune.evaluation.perplexity import check_seqlen, perplexity
from layerprune.export import RunDir, check_out_dir, sparse_size_bytes
from layerprune.models.adapter import ModelAdapter
from layerprune.models.loading import cache_dir, load_model, parse_dtype
from layerprune.pruners import Pattern, get_pruner, parse_nm
from layerprune.pruners.masks import check_sparsity
from layerprune.record import args_hash, now, versions, weights_hash
from layerprune.utils import resolve_device, write_atomic

log = logging.getLogger("layerprune")


def parse_pattern(pattern: str, sparsity: float | None) -> tuple[float, int, int]:
    """``unstructured`` → (sparsity, 0, 0); ``N:M`` → (N/M, N, M)."""
    if pattern == "unstructured":
        require(sparsity is not None, "--sparsity is required for unstructured pruning")
        check_sparsity(float(sparsity))  # type: ignore[arg-type]
        return float(sparsity), 0, 0  # type: ignore[arg-type]
    n, m = parse_nm(pattern)
    if sparsity is not None and abs(float(sparsity) - n / m) > 1e-9:
        log.info("pattern %s fixes the sparsity at %.3f (ignoring --sparsity %s)", pattern, n / m, sparsity)
    return n / m, n, m


def check_datasets(names: Iterable[str]) -> list[str]:
    out = [d.strip() for d in names if d and d.strip()]
    for d in out:
        require(d in SOURCES, f"unknown dataset '{d}': use one of {', '.join(SOURCES)}")
    return out


class Session:
    """A loaded model plus its lazily computed, shared calibration products (computed at most once)."""

    def __init__(self, model: nn.Module, tokenizer, device: torch.device, calib: str = "c4", nsamples: int = 128,
                 seqlen: int = 2048, seed: int = 0, batch_size: int = 8, offload: str = "auto",
                 progress: bool = True, use_cache: bool = True) -> None:
        require(nsamples >= 1, f"--nsamples must be at least 1 (got {nsamples})")
        require(batch_size >= 1, f"--batch-size must be at least 1 (got {batch_size})")
        require(calib in SOURCES, f"unknown calibration dataset '{calib}': use one of {', '.join(SOURCES)}")
        check_seqlen(model, seqlen)
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.adapter = ModelAdapter.of(model)
        self.calib_name, self.nsamples, self.seqlen, self.seed = calib, nsamples, seqlen, seed
        self.batch_size, self.offload, self.progress, self.use_cache = batch_size, offload, progress, use_cache
        self._calib: CalibSet | None = None
        self._stats: DenseStats | None = None
        self._sv: torch.Tensor | None = None
        self._whash: str | None = None

    def weights_hash(self) -> str:
        if self._whash is None:
            self._whash = weights_hash(self.model)
        return self._whash

    def calib(self) -> CalibSet:
        if self._calib is None:
            t = time.perf_counter()
            self._calib = sample_c4_windows(self.tokenizer, self.nsamples, self.seqlen, self.seed, self.calib_name)
            log.info("calibration: %d x %d tokens from %s (seed %d) in %.1f s", self.nsamples, self.seqlen,
                     self.calib_name, self.seed, time.perf_counter() - t)
        return self._calib

    def sv_ids(self, n: int = 32) -> torch.Tensor:
        """SV-evaluation windows, disjoint from the pruning calibration set: the calibration
        documents it did not use are joined with "\\n\\n", tokenised, cut into non-overlapping
        windows of ``seqlen``, and ``n`` of them are drawn with ``random.Random(seed + 1)``."""
        if self._sv is None or self._sv.shape[0] < n:
            import random

            used = set(self.calib().doc_ids)
            docs = load_documents(self.calib_name, calib_split(self.calib_name))
            win = token_windows(self.tokenizer, "\n\n".join(d for i, d in enumerate(docs) if i not in used), self.seqlen)
            if win.shape[0] < n:
                raise UserError(f"only {win.shape[0]} held-out windows of {self.seqlen} tokens for the SV set: "
                                "lower --sv-samples or --seqlen")
            self._sv = win[sorted(random.Random(self.seed + 1).sample(range(win.shape[0]), n))]
        return self._sv[:n]

    def dense_stats(self) -> DenseStats:
        if self._stats is None:
            key = args_hash({"w": self.weights_hash(), "calib": self.calib().fingerprint(), "v": 1})
            path = cache_dir() / "stats" / f"{key}.json"
            if self.use_cache and path.is_file():
                self._stats = DenseStats.from_json(json.loads(path.read_text()))
                log.info("dense statistics: loaded from cache %s", path.name)
            else:
                self._stats = dense_stats_pass(self.model, self.adapter, self.calib().input_ids, self.device,
                                               self.batch_size, self.offload, progress=self.progress)
                if self.use_cache and is_main():
                    write_atomic(path, json.dumps(self._stats.to_json()))
        return self._stats

    def context(self, pruner: str, pruner_kwargs: dict | None = None) -> AllocContext:
        needs = get_pruner(pruner).needs_data
        return AllocContext(self.adapter, dense_stats=self.dense_stats,
                            calib=lambda: self.calib().input_ids if needs else None,
                            extra={"device": self.device, "pruner": pruner, "batch_size": self.batch_size,
                                   "progress": self.progress, "seqlen": self.seqlen, "sv_ids": self.sv_ids,
                                   "pruner_kwargs": pruner_kwargs or {}})

    def allocate(self, method: str, target: float, options: dict | None = None, pruner: str = "wanda",
                 nm: tuple[int, int] | None = None, pruner_kwargs: dict | None = None) -> Allocation:
        fn = get_allocator(method, nm is not None)
        opts = {k: v for k, v in (options or {}).items() if v is not None}
        # the cache key holds every option with its *resolved* value, so a changed default never reuses a stale entry
        resolved = {k: p.default for k, p in inspect.signature(fn).parameters.items()
                    if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}
        key_d = {"w": self.weights_hash(), "method": method, "target": target, "opts": {**resolved, **opts}, "nm": nm}
        if method != "alphapruning":
            key_d.update(calib=self.calib_name, nsamples=self.nsamples, seqlen=self.seqlen, seed=self.seed)
        if method == "svnup":
            key_d.update(pruner=pruner, pruner_kwargs=pruner_kwargs)
        key = args_hash(key_d)
        path = cache_dir() / "ratios" / f"{method}-{key}.json"
        if self.use_cache and method != "uniform" and path.is_file():
            alloc = Allocation.from_json(json.loads(path.read_text()))
            alloc.diagnostics["cached"] = str(path)
            log.info("allocation %s: loaded from cache %s", method, path.name)
            return alloc
        t = time.perf_counter()
        alloc = fn(self.context(pruner, pruner_kwargs), target, **opts)
        alloc.diagnostics["seconds"] = time.perf_counter() - t
        if nm is not None:
            n, m = nm
            if method == "uniform":
                alloc.nm = [n] * self.adapter.n_blocks
            else:  # dlp / owl: round the allocated profile to a per-block N
                alloc.nm = mixed_nm(alloc.per_block, self.adapter.block_sizes(), n, m)
                if len(set(alloc.nm)) == 1:
                    spread = max(alloc.per_block) - min(alloc.per_block)
                    log.warning("%s: the allocated spread (%.3f) is smaller than one N:M step (1/%d), so every "
                                "block rounds to %d:%d, i.e. uniform; use a larger M (e.g. %d:%d) or a wider band",
                                method, spread, m, n, m, 2 * n, 2 * m)
            alloc.m = m
            alloc.per_block = [k / m for k in alloc.nm]
            alloc.per_linear = expand_blocks(self.adapter, alloc.per_block)
        if self.use_cache and method != "uniform" and is_main():
            write_atomic(path, json.dumps({**alloc.to_json(), "key": key_d}, default=str))
        return alloc

    def plan(self, alloc: Allocation) -> dict[str, Pattern]:
        """Per-linear patterns: ``n`` zeros in every ``m`` (``n = 0`` keeps the block dense), or unstructured."""
        if alloc.nm is not None:
            m = alloc.m
            return {self.adapter.full_name(i, n): Pattern(k / m, k, m) if k > 0 else Pattern(0.0)
                    for i, k in enumerate(alloc.nm) for n in self.adapter.linear_names[i]}
        return {k: Pattern(v) for k, v in alloc.per_linear.items()}

def _load(model: str | nn.Module, tokenizer, dtype: str, device: torch.device, trust_remote_code: bool):
    if isinstance(model, str):
        m, tok = load_model(model, dtype=parse_dtype(dtype), device="cpu", trust_remote_code=trust_remote_code)
        return m, tok, model
    require(tokenizer is not None, "pass tokenizer= together with a model object")
    return model, tokenizer, getattr(model, "layerprune_source", type(model).__name__)


def evaluate_ppl(model: nn.Module, tokenizer, datasets: list[str], seqlen: int, max_windows: int | None,
                 device: torch.device, batch_size: int = 1) -> dict[str, dict]:
    model.to(device)
    out = {}
    for d in datasets:
        t = time.perf_counter()
        r = perplexity(model, tokenizer, d, seqlen, max_windows, batch_size)
        r["seconds"] = time.perf_counter() - t
        out[d] = r
        log.info("ppl %s (seqlen %d, %d windows): %.3f", d, seqlen, r["windows"], r["ppl"])
    return out


def prune(model: str | nn.Module, sparsity: float | None = 0.5, pruner: str = "wanda", pattern: str = "unstructured",
          allocation: str = "uniform", alloc_options: dict | None = None, calib: str = "c4", nsamples: int = 128,
          seqlen: int = 2048, seed: int = 0, device: str = "auto", dtype: str = "float32", batch_size: int = 8,
          offload: str = "auto", eval: Iterable[str] = ("wikitext2",), eval_seqlen: int | None = None,
          eval_max_windows: int | None = None, eval_batch_size: int = 1, out: str | Path | None = None,
          tokenizer: Any = None, trust_remote_code: bool = False, progress: bool = True, use_cache: bool = True,
          pruner_kwargs: dict | None = None, dense_ppl: bool = False, session: Session | None = None,
          keep_model: bool = False, quantize: str | None = None, group_size: int | None = None,
          tasks: Iterable[str] = (), limit: int | None = None) -> dict:
    """Prune a causal LM and return the run record (see README, "Run record").

    ``model`` is a spec (hub id, local dir, ``.gguf``, alias) or a model object with ``tokenizer``.
    The model is pruned in place; with ``out`` it is exported atomically (resumable).
    """
    # ---- validate everything before any heavy work
    target, n, m = parse_pattern(pattern, sparsity)
    get_pruner(pruner)
    get_allocator(allocation, bool(m))
    evals = check_datasets(eval)
    tasks = [t for t in tasks if t]
    if tasks:
        from layerprune.evaluation.zeroshot import check_tasks

        check_tasks(tasks)
    if quantize:
        from layerprune.quantize import check_bits

        check_bits(quantize, group_size)
    require(nsamples >= 1, f"--nsamples must be at least 1 (got {nsamples})")
    if out is not None:
        check_out_dir(out)
    dev = resolve_device(init_from_env(device))
    if not is_main():  # data-parallel: only rank 0 evaluates, composes and exports
        evals, tasks, out, quantize, dense_ppl = [], [], None, None, False
    t_start = time.perf_counter()
    config = {"model": model if isinstance(model, str) else getattr(model, "layerprune_source", "object"),
              "sparsity": target, "pruner": pruner, "pattern": pattern, "allocation": allocation,
              "alloc_options": alloc_options or {}, "calib": calib, "nsamples": nsamples, "seqlen": seqlen,
              "seed": seed, "dtype": dtype, "batch_size": batch_size, "pruner_kwargs": pruner_kwargs or {},
              "quantize": quantize, "group_size": group_size, "world_size": world_size()}
    # ---- load
    if session is None:
        mdl, tok, src = _load(model, tokenizer, dtype, dev, trust_remote_code)
        session = Session(mdl, tok, dev, calib, nsamples, seqlen, seed, batch_size, offload, progress, use_cache)
    mdl, tok = session.model, session.tokenizer
    batch_size, offload = session.batch_size, session.offload  # the session's settings win
    config.update(calib=session.calib_name, nsamples=session.nsamples, seqlen=session.seqlen, seed=session.seed,
                  batch_size=session.batch_size)
    eseq = eval_seqlen or session.seqlen
    if evals:
        check_seqlen(mdl, eseq)
    record: dict[str, Any] = {"config": config, "versions": versions(), "started": now(), "device": str(dev),
                              "model": config["model"]}
    # the resume store is opened before any heavy work, so a refused resume costs nothing
    run_dir = RunDir(out, args_hash({**config, "w": session.weights_hash()})) if out is not None else None
    if run_dir is not None and run_dir.done and active():
        raise UserError(f"resuming {out} works in a single process only: rerun it without torchrun "
                        f"(or delete .{Path(out).name}.partial to start again)")
    if dense_ppl and evals:
        record["dense_ppl"] = {k: v["ppl"] for k, v in evaluate_ppl(mdl, tok, evals, eseq, eval_max_windows, dev, eval_batch_size).items()}
        mdl.to("cpu")
    # ---- allocate
    alloc = session.allocate(allocation, target, alloc_options, pruner, (n, m) if m else None, pruner_kwargs)
    plan = session.plan(alloc)
    # ---- prune
    needs = get_pruner(pruner).needs_data
    res = prune_sequential(mdl, session.adapter, session.calib().input_ids if needs else None, plan, pruner, dev,
                           batch_size, offload, run_dir, progress, pruner_kwargs)
    # ---- compose, evaluate (everything lands in the record before the output directory is renamed)
    ppl_pruned = None
    quant = None
    if quantize:
        from layerprune.quantize import quantize_model

        if evals:
            ppl_pruned = evaluate_ppl(mdl, tok, evals, eseq, eval_max_windows, dev, eval_batch_size)
        quant = quantize_model(mdl, quantize, group_size)
    ppl = evaluate_ppl(mdl, tok, evals, eseq, eval_max_windows, dev, eval_batch_size) if evals else {}
    zs: dict = {}
    if tasks:
        from layerprune.evaluation.zeroshot import zero_shot

        zs = zero_shot(mdl, tok, tasks, limit=limit, device=dev)
    linear_names = list(res.per_linear)
    record.update({
        "sparsity": {"target": target, "achieved": res.achieved(),
                     "pattern": pattern if m else "unstructured"},
        "per_block": alloc.per_block,
        "per_block_achieved": [b["achieved"] for b in res.per_block],
        "allocation": {"method": allocation, "options": alloc_options or {}, "diagnostics": alloc.diagnostics,
                       "nm": alloc.nm, "m": alloc.m},
        "per_linear": res.per_linear,
        "blocks": res.per_block,
        "ppl": {k: v["ppl"] for k, v in ppl.items()},
        "ppl_details": ppl,
        "tasks": zs.get("tasks", {}),
        "timing": {"prune_seconds": res.seconds, "mask_seconds": sum(b["prune_seconds"] for b in res.per_block),
                   "calib_tokens": res.calib_tokens,
                   "block_forwards": res.block_forwards,
                   "calib_tokens_per_second": res.calib_tokens * res.block_forwards / max(res.seconds, 1e-9) if needs else None,
                   "allocation_seconds": alloc.diagnostics.get("seconds"),
                   "total_seconds": time.perf_counter() - t_start},
        "peak_mem_mb": res.peak_mem_mb,
        "size": sparse_size_bytes(mdl, linear_names),
        "finished": now(),
    })
    if quant is not None:
        record["quantization"] = quant
        record["size"] = quant["size"]
        if ppl_pruned is not None:
            record["ppl_before_quantization"] = {k: v["ppl"] for k, v in ppl_pruned.items()}
    if zs:
        record["zero_shot"] = {k: v for k, v in zs.items() if k != "tasks"}
    if run_dir is not None:
        mdl.to("cpu")
        run_dir.finalize(mdl, tok, record)
        record["out"] = str(out)
    if keep_model:
        record["_model"] = mdl
        record["_tokenizer"] = tok
    return record


def allocate(model: str | nn.Module, sparsity: float = 0.7, allocation: str = "dlp", options: dict | None = None,
             pattern: str = "unstructured", pruner: str = "wanda", calib: str = "c4", nsamples: int = 128,
             seqlen: int = 2048, seed: int = 0, device: str = "auto", dtype: str = "float32", batch_size: int = 8,
             offload: str = "auto", tokenizer: Any = None, trust_remote_code: bool = False, progress: bool = True,
             use_cache: bool = True) -> dict:
    """Compute (and cache) the per-block sparsities of one allocation method; returns its JSON."""
    target, n, m = parse_pattern(pattern, sparsity)
    get_allocator(allocation, bool(m))
    get_pruner(pruner)
    dev = resolve_device(init_from_env(device))
    mdl, tok, src = _load(model, tokenizer, dtype, dev, trust_remote_code)
    s = Session(mdl, tok, dev, calib, nsamples, seqlen, seed, batch_size, offload, progress, use_cache)
    alloc = s.allocate(allocation, target, options, pruner, (n, m) if m else None)
    return {"model": src, "method": allocation, "target": target, "per_block": alloc.per_block,
            "block_sizes": s.adapter.block_sizes(), "nm": alloc.nm, "m": alloc.m, **alloc.diagnostics}


def evaluate(model: str | nn.Module, ppl: Iterable[str] = ("wikitext2",), seqlen: int = 2048,
             max_windows: int | None = None, tasks: Iterable[str] = (), limit: int | None = None,
             device: str = "auto", dtype: str = "float32", batch_size: int = 1, tokenizer: Any = None,
             trust_remote_code: bool = False, task_batch_size: int = 16) -> dict:
    """Perplexity (reference protocol) and zero-shot accuracy of a model; the ``eval`` record."""
    names = check_datasets(ppl)
    task_list = [t.strip() for t in tasks if t and t.strip()]
    if task_list:
        from layerprune.evaluation.zeroshot import check_tasks

        check_tasks(task_list)
    dev = resolve_device(device)
    mdl, tok, src = _load(model, tokenizer, dtype, dev, trust_remote_code)
    if names:
        check_seqlen(mdl, seqlen)
    t = time.perf_counter()
    res = evaluate_ppl(mdl, tok, names, seqlen, max_windows, dev, batch_size)
    out: dict[str, Any] = {"model": src, "ppl": {k: v["ppl"] for k, v in res.items()}, "ppl_details": res,
                           "tasks": {}, "device": str(dev), "dtype": dtype, "versions": versions()}
    if task_list:
        from layerprune.evaluation.zeroshot import zero_shot

        zs = zero_shot(mdl, tok, task_list, limit=limit, batch_size=task_batch_size, device=dev)
        out["tasks"] = zs["tasks"]
        out["zero_shot"] = {k: v for k, v in zs.items() if k != "tasks"}
    out["seconds"] = time.perf_counter() - t
    return out
