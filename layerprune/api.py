"""The one way through layerprune: validate → load → allocate → prune → evaluate → export.

``prune()`` reads as that sequence. Calibration and evaluation settings are two small dataclasses
(:class:`CalibConfig`, :class:`EvalConfig`) owned by the :class:`Session`, which also owns the lazily
computed products shared by every run on one model (calibration windows, dense statistics, SV set).
Every input is validated before the model is loaded and before any directory is created.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from layerprune.allocation import AllocContext, Allocation, check_target, get_allocator, mixed_nm
from layerprune.allocation.common import expand_blocks
from layerprune.allocation.stats import DenseStats, dense_stats_pass
from layerprune.data import prefetch
from layerprune.data.calibration import CalibSet, sample_c4_windows, token_windows
from layerprune.data.sources import SOURCES, calib_split, check_datasets, load_documents
from layerprune.data.sources import data_dir as resolve_data_dir
from layerprune.distributed import active, init_from_env, is_main, world_size
from layerprune.engine.fused import fused_ops
from layerprune.engine.sequential import prune_sequential
from layerprune.errors import UserError, require
from layerprune.evaluation.perplexity import check_seqlen, eval_windows, evaluate_ppl
from layerprune.export import RunDir, check_out_dir, open_run_dir
from layerprune.models.adapter import ModelAdapter
from layerprune.models.loading import cache_dir, check_model_spec, load_model, load_placement, parse_dtype
from layerprune.options import resolved
from layerprune.pruners import Pattern, get_pruner, parse_pattern
from layerprune.record import args_hash, now, run_record, versions, weights_hash
from layerprune.specs import AllocatorSpec, PrunerSpec
from layerprune.utils import resolve_device, write_atomic

log = logging.getLogger("layerprune")

OFFLOAD = ("auto", "cpu", "device")
STARTED_AT: float | None = None  # set by the CLI: when the process imported layerprune (record: startup_seconds)


@dataclass(frozen=True)
class CalibConfig:
    """Calibration settings: ``nsamples`` windows of ``seqlen`` tokens from ``source`` (seed ``seed``),
    run ``batch_size`` at a time; activations on the accelerator or streamed from the CPU (``offload``)."""

    source: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8
    offload: str = "auto"

    def validate(self) -> "CalibConfig":
        require(self.source in SOURCES, f"unknown calibration dataset '{self.source}': use one of {', '.join(SOURCES)}")
        require(self.nsamples >= 1, f"--nsamples must be at least 1 (got {self.nsamples})")
        require(self.seqlen >= 2, f"--seqlen must be at least 2 (got {self.seqlen})")
        require(self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})")
        require(self.offload in OFFLOAD, f"--offload must be one of {', '.join(OFFLOAD)} (got {self.offload!r})")
        return self

    def key(self) -> dict:
        """What determines the calibration windows (batching and offload change no result)."""
        return {"calib": self.source, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed}


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings: perplexity ``datasets`` at ``seqlen`` (``None``: the calibration seqlen) over the
    first ``max_windows`` windows, and lm-eval zero-shot ``tasks`` on ``limit`` documents each."""

    datasets: tuple[str, ...] = ("wikitext2",)
    seqlen: int | None = None
    max_windows: int | None = None
    batch_size: int = 1
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    task_batch_size: int | str = 16

    def validate(self) -> "EvalConfig":
        ds = tuple(check_datasets(self.datasets))
        tasks = tuple(t.strip() for t in self.tasks if t and t.strip())
        if tasks:
            from layerprune.evaluation.zeroshot import check_tasks

            check_tasks(list(tasks))
        require(self.seqlen is None or self.seqlen >= 2, f"--eval-seqlen must be at least 2 (got {self.seqlen})")
        require(self.max_windows is None or self.max_windows >= 1,
                f"--eval-max-windows must be at least 1 (got {self.max_windows}); leave it out for all windows")
        require(self.batch_size >= 1, f"--eval-batch-size must be at least 1 (got {self.batch_size})")
        require(self.limit is None or self.limit >= 1, f"--limit must be at least 1 (got {self.limit})")
        tbs = self.task_batch_size
        if isinstance(tbs, str) and tbs.strip().isdigit():
            tbs = int(tbs)
        require(tbs == "auto" or (isinstance(tbs, int) and tbs >= 1),
                f"--task-batch-size must be a positive integer or auto (got {tbs!r})")
        return dataclasses.replace(self, datasets=ds, tasks=tasks, task_batch_size=tbs)


_CALIB_KW = {"nsamples", "seqlen", "seed", "batch_size", "offload"}
_EVAL_KW = {"eval": "datasets", "eval_seqlen": "seqlen", "eval_max_windows": "max_windows",
            "eval_batch_size": "batch_size", "tasks": "tasks", "limit": "limit"}


def calib_config(calib: CalibConfig | str | None = None, **kw: Any) -> CalibConfig:
    """A :class:`CalibConfig` from a config, a source name (``"c4"``) and/or flat field values."""
    base = calib if isinstance(calib, CalibConfig) else CalibConfig(source=calib or "c4")
    return dataclasses.replace(base, **{k: v for k, v in kw.items() if v is not None}).validate()


class Session:
    """A loaded model plus its lazily computed, shared calibration products (computed at most once)."""

    def __init__(self, model: nn.Module, tokenizer, device: torch.device | str = "cpu",
                 calib: CalibConfig | str | None = None, *, progress: bool = True, use_cache: bool = True,
                 data_dir: str | Path | None = None, **calib_fields: Any) -> None:
        unknown = set(calib_fields) - _CALIB_KW
        if unknown:
            raise TypeError(f"Session() got unexpected arguments {sorted(unknown)}")
        self.calib_cfg = calib_config(calib, **calib_fields)
        check_seqlen(model, self.calib_cfg.seqlen)
        self.model, self.tokenizer, self.device = model, tokenizer, torch.device(device)
        self.adapter = ModelAdapter.of(model)
        self.progress, self.use_cache, self.data_dir = progress, use_cache, data_dir
        self.weights = None  # models.streaming.BlockWeights when the blocks are read from disk as needed
        self.scratch: Path | None = None  # where a streamed model's SV game keeps its pruned copies
        self._calib: CalibSet | None = None
        self._stats: DenseStats | None = None
        self._stats_cached = False  # read from the statistics cache rather than computed here
        self.full_stats = False  # compute every statistic whenever the sweep runs (callers that allocate several ways)
        self._sv: dict[int, torch.Tensor] = {}  # SV windows by length
        self._whash: str | None = None
        self.timing: dict[str, float] = {}  # calibration sampling and weight hashing, for the run record

    # the calibration settings, read-only (tests and bench read them by these names)
    nsamples = property(lambda self: self.calib_cfg.nsamples)
    seqlen = property(lambda self: self.calib_cfg.seqlen)
    seed = property(lambda self: self.calib_cfg.seed)
    batch_size = property(lambda self: self.calib_cfg.batch_size)
    offload = property(lambda self: self.calib_cfg.offload)

    def weights_hash(self) -> str:
        if self._whash is None:
            t = time.perf_counter()
            self._whash = weights_hash(self.model)
            self.timing["weights_hash_seconds"] = time.perf_counter() - t
        return self._whash

    def calib(self) -> CalibSet:
        if self._calib is None:
            c = self.calib_cfg
            t = time.perf_counter()
            self._calib = prefetch.take(self.tokenizer, calib_key(c, self.data_dir)) or sample_c4_windows(
                self.tokenizer, c.nsamples, c.seqlen, c.seed, c.source, data_dir=self.data_dir)
            self.timing["calibration_seconds"] = time.perf_counter() - t  # (the wait, when prefetched)
            log.info("calibration: %d x %d tokens from %s (seed %d) in %.1f s", c.nsamples, c.seqlen, c.source,
                     c.seed, time.perf_counter() - t)
        return self._calib

    def sv_ids(self, n: int = 32, seqlen: int | None = None) -> torch.Tensor:
        """SV-evaluation windows, disjoint from the pruning calibration set: the calibration
        documents it did not use are joined with "\\n\\n", tokenised, cut into non-overlapping
        windows of ``seqlen`` (default: the calibration seqlen), and ``n`` of them are drawn with
        ``random.Random(seed + 1)``."""
        c = self.calib_cfg
        seqlen = int(seqlen or c.seqlen)
        if seqlen not in self._sv or self._sv[seqlen].shape[0] < n:
            import random

            used = set(self.calib().doc_ids)
            docs = load_documents(c.source, calib_split(c.source), self.data_dir)
            win = token_windows(self.tokenizer, "\n\n".join(d for i, d in enumerate(docs) if i not in used), seqlen)
            if win.shape[0] < n:
                raise UserError(f"only {win.shape[0]} held-out windows of {seqlen} tokens for the SV set: "
                                "lower --sv-samples, --sv-seqlen or --seqlen")
            self._sv[seqlen] = win[sorted(random.Random(c.seed + 1).sample(range(win.shape[0]), n))]
        return self._sv[seqlen][:n]

    def dense_stats(self, need: str = "full") -> DenseStats:
        """The dense statistics (``allocation.stats``): ``need="mean"`` is served by any, ``"full"`` only by a
        full set. From memory, else from the cache (a full entry first), else computed: the means alone
        when they are all that is needed, unless ``full_stats`` asks for everything whenever the sweep runs."""
        if need not in ("full", "mean"):
            raise ValueError(f"dense_stats(need={need!r}): 'full' or 'mean'")
        have = self._stats
        if have is not None and (have.what == "full" or need == "mean"):
            return have
        base = {"w": self.weights_hash(), "calib": self.calib().fingerprint(), "v": 1}
        what = "full" if need == "full" or self.full_stats else "mean"
        paths = {w: cache_dir() / "stats" / f"{args_hash(base if w == 'full' else {**base, 'what': w})}.json"
                 for w in ("full", "mean")}
        for w in (("full", "mean") if what == "mean" else ("full",)):
            if self.use_cache and paths[w].is_file():
                self._stats = DenseStats.from_json(json.loads(paths[w].read_text()))
                self._stats_cached = True
                log.info("dense statistics: loaded from cache %s", paths[w].name)
                return self._stats
        self._stats = dense_stats_pass(self.model, self.adapter, self.calib().input_ids, self.device,
                                       self.batch_size, self.offload, progress=self.progress,
                                       weights=self.weights, what=what)
        self._stats_cached = False
        if self.use_cache and is_main():
            write_atomic(paths[what], json.dumps(self._stats.to_json()))
        return self._stats

    def context(self, pruner: PrunerSpec, pruner_options: Any, allow_long: bool = False) -> AllocContext:
        return AllocContext(self.adapter, dense_stats=self.dense_stats,
                            calib=lambda: self.calib().input_ids if pruner.needs_data else None,
                            extra={"device": self.device, "pruner": pruner.name, "batch_size": self.batch_size,
                                   "progress": self.progress, "seqlen": self.seqlen, "sv_ids": self.sv_ids,
                                   "pruner_kwargs": pruner_options, "weights": self.weights,
                                   "scratch": self.scratch},
                            allow_long=allow_long)

    def cache_key(self, spec: AllocatorSpec, target: float, opts: Any, nm: tuple[int, int] | None,
                  pruner: PrunerSpec, pruner_options: Any) -> dict:
        """Everything the allocation depends on, generated from the spec: every option with its resolved
        value, the calibration settings if it reads calibration data, the base pruner if it runs one."""
        key = {"w": self.weights_hash(), "method": spec.name, "target": target, "opts": resolved(opts), "nm": nm}
        if spec.needs_calibration or spec.needs_pruner:
            key.update(self.calib_cfg.key())
        if spec.needs_pruner:
            key.update(pruner=pruner.name, pruner_options=resolved(pruner_options))
        return key

    def allocate(self, method: str, target: float, options: Any = None, pruner: str = "wanda",
                 nm: tuple[int, int] | None = None, pruner_kwargs: Any = None, allow_long: bool = False) -> Allocation:
        spec = get_allocator(method, nm is not None)
        check_target(spec, target)
        opts = spec.make_options(options)
        pspec = get_pruner(pruner)
        popts = pspec.make_options(pruner_kwargs)
        key_d = self.cache_key(spec, target, opts, nm, pspec, popts)
        key = args_hash(key_d)
        path = cache_dir() / "ratios" / f"{method}-{key}.json"
        if self.use_cache and spec.cached and path.is_file():
            t = time.perf_counter()
            alloc = Allocation.from_json(json.loads(path.read_text()))
            alloc.diagnostics["cached"] = str(path)
            # "seconds" is this run's time (the cache read); the run that computed it keeps its own
            alloc.diagnostics["computed_seconds"] = alloc.diagnostics.get("seconds")
            alloc.diagnostics["seconds"] = time.perf_counter() - t
            log.info("allocation %s: loaded from cache %s", method, path.name)
            return alloc
        t = time.perf_counter()
        before = self._stats
        alloc = spec.fn(self.context(pspec, popts, allow_long), target, opts)
        alloc.diagnostics["seconds"] = time.perf_counter() - t
        if self._stats is not None and self._stats is not before and not self._stats_cached:  # the pass ran in this call
            alloc.diagnostics["dense_stats_split"] = {**self._stats.split, "seconds": self._stats.seconds}
        if nm is not None:
            self._round_nm(alloc, method, nm)
        if self.use_cache and spec.cached and is_main():
            write_atomic(path, json.dumps({**alloc.to_json(), "key": key_d}, default=str))
        return alloc

    def _round_nm(self, alloc: Allocation, method: str, nm: tuple[int, int]) -> None:
        """Mixed N:M: round the allocated profile to a per-block N (a flat profile: every block N)."""
        n, m = nm
        alloc.nm = mixed_nm(alloc.per_block, self.adapter.block_sizes(), n, m)  # a flat profile gives N everywhere
        spread = max(alloc.per_block) - min(alloc.per_block)
        if len(set(alloc.nm)) == 1 and spread > 1e-9:
            log.warning("%s: the allocated spread (%.3f) is smaller than one N:M step (1/%d), so every "
                        "block rounds to %d:%d, i.e. uniform; use a larger M (e.g. %d:%d) or a wider band",
                        method, spread, m, n, m, 2 * n, 2 * m)
        alloc.m = m
        alloc.per_block = [k / m for k in alloc.nm]
        alloc.per_linear = expand_blocks(self.adapter, alloc.per_block)

    def plan(self, alloc: Allocation) -> dict[str, Pattern]:
        """Per-linear patterns: ``n`` zeros in every ``m`` (``n = 0`` keeps the block dense), or unstructured."""
        if alloc.nm is not None:
            m = alloc.m
            return {self.adapter.full_name(i, n): Pattern(k / m, k, m) if k > 0 else Pattern(0.0)
                    for i, k in enumerate(alloc.nm) for n in self.adapter.linear_names[i]}
        return {k: Pattern(v) for k, v in alloc.per_linear.items()}

    def evaluate(self, ev: EvalConfig, seqlen_default: int | None = None) -> dict[str, dict]:
        """Perplexities of the session's model under ``ev``."""
        seq = ev.seqlen or seqlen_default or self.seqlen
        return evaluate_ppl(self.model, self.tokenizer, list(ev.datasets), seq, ev.max_windows, self.device,
                            ev.batch_size, self.data_dir, progress=False,
                            flag="--eval-seqlen" if ev.seqlen else "--seqlen")


def calib_key(c: CalibConfig, data_dir) -> tuple:
    """What a prefetched calibration set is filed under (everything ``sample_c4_windows`` reads)."""
    return ("calib", c.nsamples, c.seqlen, c.seed, c.source, str(data_dir))


def start_prefetch(tok, *, cal: CalibConfig, ev: "EvalConfig", root, calib: bool) -> None:
    """Tokenise the calibration set (when the run reads one) and the evaluation windows on a background
    thread while the weights load (:mod:`layerprune.data.prefetch`)."""
    jobs: dict[Any, Any] = {}
    if calib:
        jobs[calib_key(cal, root)] = partial(sample_c4_windows, tok, cal.nsamples, cal.seqlen, cal.seed, cal.source,
                                             data_dir=root)
    seq = ev.seqlen or cal.seqlen
    for d in ev.datasets:
        jobs[("eval", d)] = partial(eval_windows, tok, d, seq, ev.max_windows, data_dir=root,
                                    flag="--eval-seqlen" if ev.seqlen else "--seqlen")
    if jobs:
        prefetch.start(tok, jobs)


def load(model: str | nn.Module, tokenizer=None, dtype: str = "float32", trust_remote_code: bool = False,
         device: torch.device | str = "cpu", on_tokenizer=None):
    """``(model, tokenizer, source name)`` from a model spec, or a model object with its tokenizer.

    ``device`` a GPU: a local checkpoint that fits is loaded straight onto it (:func:`load_placement`).
    ``on_tokenizer(tok)`` runs before the weights load (``prune`` starts tokenising there)."""
    if isinstance(model, str):
        from layerprune.models import preload

        place = (preload.placement(model, parse_dtype(dtype), torch.device(device))
                 or load_placement(model, parse_dtype(dtype), torch.device(device)))
        m, tok = load_model(model, dtype=parse_dtype(dtype), device=place, trust_remote_code=trust_remote_code,
                            on_tokenizer=on_tokenizer)
        return m, tok, model
    require(tokenizer is not None, "pass tokenizer= together with a model object")
    return model, tokenizer, getattr(model, "layerprune_source", type(model).__name__)


@dataclass
class PruneRequest:
    """A validated prune: the pattern, both methods with their options, and the run's settings."""

    target: float
    n: int
    m: int
    pattern: str
    pruner: PrunerSpec
    pruner_options: Any
    allocator: AllocatorSpec
    alloc_options: Any
    quantize: str | None = None
    group_size: int | None = None

    @property
    def nm(self) -> tuple[int, int] | None:
        return (self.n, self.m) if self.m else None

    def config(self, model_name: str, calib: CalibConfig, dtype: str) -> dict:
        """The run configuration recorded in ``layerprune.json`` and hashed for resuming."""
        return {"model": model_name, "sparsity": self.target, "pruner": self.pruner.name, "pattern": self.pattern,
                "allocation": self.allocator.name, "alloc_options": resolved(self.alloc_options),
                **calib.key(), "batch_size": calib.batch_size, "dtype": dtype,
                "pruner_kwargs": resolved(self.pruner_options), "quantize": self.quantize,
                "group_size": self.group_size, "world_size": world_size()}


def plan_prune(sparsity: float | None, pruner: str, pattern: str, allocation: str, alloc_options: Any,
               pruner_options: Any, quantize: str | None = None, group_size: int | None = None) -> PruneRequest:
    """Validate every method choice and option (nothing is loaded); one ``UserError`` on the first problem."""
    target, n, m = parse_pattern(pattern, sparsity)
    pspec = get_pruner(pruner)
    aspec = get_allocator(allocation, bool(m))
    check_target(aspec, target)
    req = PruneRequest(target, n, m, pattern if m else "unstructured", pspec, pspec.make_options(pruner_options),
                       aspec, aspec.make_options(alloc_options), quantize, group_size)
    if quantize:
        from layerprune.quantize import check_bits

        check_bits(quantize, group_size)
    return req


def _split_legacy(kw: dict) -> tuple[dict, dict, Any]:
    """The flat keywords of earlier versions (``nsamples=``, ``eval=``, ``pruner_kwargs=`` …)."""
    calib_kw = {k: kw.pop(k) for k in list(kw) if k in _CALIB_KW}
    eval_kw = {_EVAL_KW[k]: kw.pop(k) for k in list(kw) if k in _EVAL_KW}
    pk = kw.pop("pruner_kwargs", None)
    if kw:
        raise TypeError(f"prune() got unexpected keyword arguments {sorted(kw)}")
    for k in ("datasets", "tasks"):
        if k in eval_kw:
            eval_kw[k] = tuple(eval_kw[k] or ())
    return calib_kw, eval_kw, pk


def prune(model: str | nn.Module, *, sparsity: float | None = 0.5, pruner: str = "wanda",
          pattern: str = "unstructured", allocation: str = "uniform", alloc_options: Any = None,
          pruner_options: Any = None, calib: CalibConfig | str | None = None, evaluation: EvalConfig | None = None,
          device: str = "auto", dtype: str = "float32", out: str | Path | None = None, tokenizer: Any = None,
          trust_remote_code: bool = False, progress: bool = True, use_cache: bool = True, dense_ppl: bool = False,
          session: Session | None = None, keep_model: bool = False, quantize: str | None = None,
          group_size: int | None = None, allow_long: bool = False, data_dir: str | Path | None = None,
          stream: bool = False, **legacy: Any) -> dict:
    """Prune a causal LM and return the run record (see README, "Run record").

    ``model`` is a spec (hub id, local dir, ``.gguf``, alias) or a model object with ``tokenizer``.
    The model is pruned in place; with ``out`` it is exported atomically (resumable). Calibration and
    evaluation settings come as :class:`CalibConfig` / :class:`EvalConfig` or, as before, as flat
    keywords (``nsamples=``, ``seqlen=``, ``eval=[...]``, ``eval_seqlen=``, ``tasks=`` …).
    ``stream``: the model (a local safetensors directory) is never whole in host memory: each block is read
    when it is pruned, checkpointed into ``out`` and dropped; perplexity runs block by block; the output is
    written shard by shard from the checkpoints (uniform, DLP, OWL and SV-NUP allocation; the SV game keeps its
    pruned copies on disk).
    """
    t_start, started = time.perf_counter(), now()
    # ---- validate everything before any heavy work (nothing loaded, nothing created)
    calib_kw, eval_kw, pk = _split_legacy(dict(legacy))
    if pk is not None:
        require(pruner_options is None, "pass pruner_options= or pruner_kwargs=, not both")
        pruner_options = pk
    req = plan_prune(sparsity, pruner, pattern, allocation, alloc_options, pruner_options, quantize, group_size)
    if session is not None:
        c = session.calib_cfg
        clash = {k: v for k, v in calib_kw.items() if getattr(c, k) != v}
        if calib is not None and calib_config(calib) != c:
            clash["calib"] = calib
        require(not clash, f"prune(session=...) calibrates with the session's settings; these differ: {clash} "
                           "(make a new Session with them)")
        cal = c
    else:
        cal = calib_config(calib, **calib_kw)
    ev = dataclasses.replace(evaluation or EvalConfig(), **eval_kw).validate()
    if out is not None:
        check_out_dir(out)
    if stream:
        check_stream(model, out, req, ev, dense_ppl, session)
    root = resolve_data_dir(session.data_dir if session is not None and data_dir is None else data_dir)
    if isinstance(model, str) and session is None:
        check_model_spec(model)
    dev = resolve_device(init_from_env(device))
    if not is_main():  # data-parallel: only rank 0 evaluates, composes and exports
        ev, out, dense_ppl = EvalConfig(datasets=()), None, False
        req.quantize = None
    # ---- load
    t_load = time.perf_counter()
    if session is None and stream:
        from layerprune.models.streaming import open_streamed

        mdl, tok, weights = open_streamed(model, parse_dtype(dtype), trust_remote_code)
        session = Session(mdl, tok, dev, cal, progress=progress, use_cache=use_cache, data_dir=root)
        session.weights = weights
        session._whash = weights.fingerprint()
    elif session is None:
        early = partial(start_prefetch, cal=cal, ev=ev, root=root,
                        calib=req.pruner.needs_data or req.allocator.needs_calibration)
        mdl, tok, src = load(model, tokenizer, dtype, trust_remote_code, dev,
                             on_tokenizer=early if isinstance(model, str) else None)
        session = Session(mdl, tok, dev, cal, progress=progress, use_cache=use_cache, data_dir=root)
    load_s = time.perf_counter() - t_load
    mdl, tok = session.model, session.tokenizer
    model_name = model if isinstance(model, str) else getattr(model, "layerprune_source", "object")
    config = req.config(model_name, cal, dtype)
    if ev.datasets:
        check_seqlen(mdl, ev.seqlen or cal.seqlen, "--eval-seqlen" if ev.seqlen else "--seqlen")
    timing: dict[str, Any] = {"load_seconds": load_s, "started": started,
                              "loaded_on": str(next(mdl.parameters()).device)}
    with open_run_dir(out, lambda: args_hash({**config, "w": session.weights_hash()}), mdl) as run_dir, \
            fused_ops(mdl, dev) as fused:
        if run_dir is not None and run_dir.done and active():
            raise UserError(f"resuming {out} works in a single process only: rerun it without torchrun "
                            f"(or delete .{Path(out).name}.partial to start again)")
        home = next(mdl.parameters()).device
        dense = session.evaluate(ev) if dense_ppl and ev.datasets else {}
        if dense:
            mdl.to(home)  # back where it was loaded (the engine decides per pass what stays on the GPU)
        # ---- allocate
        if session.weights is not None and req.allocator.name == "svnup":
            session.scratch = stream_scratch(session, run_dir, out)
        alloc = session.allocate(req.allocator.name, req.target, req.alloc_options, req.pruner.name, req.nm,
                                 req.pruner_options, allow_long)
        # ---- prune
        res = prune_sequential(mdl, session.adapter, session.calib().input_ids if req.pruner.needs_data else None,
                               session.plan(alloc), req.pruner.name, dev, session.batch_size, session.offload,
                               run_dir, progress, req.pruner_options, weights=session.weights)
        # ---- compose, evaluate (everything lands in the record before the output directory is renamed)
        t_eval = time.perf_counter()
        before_q, quant = {}, None
        if req.quantize:
            from layerprune.quantize import quantize_model

            before_q = session.evaluate(ev) if ev.datasets else {}
            quant = quantize_model(mdl, req.quantize, req.group_size)
        if session.weights is not None:
            ppl = streamed_ppl(session, ev, run_dir) if ev.datasets else {}
        else:
            ppl = session.evaluate(ev) if ev.datasets else {}
        zs: dict = {}
        if ev.tasks:
            from layerprune.evaluation.zeroshot import zero_shot

            zs = zero_shot(mdl, tok, list(ev.tasks), limit=ev.limit, batch_size=ev.task_batch_size, device=dev,
                           data_dir=root)
        timing["eval_seconds"] = time.perf_counter() - t_eval
        timing["total_seconds"] = time.perf_counter() - t_start
        timing.update(session.timing)  # parts of the above: calibration sampling, weight hashing (if done now)
        timing.update(prefetch.WAITED)  # the background tokenising (its own time) and the waits for it
        prefetch.WAITED.clear()
        timing.update(getattr(mdl, "layerprune_load_timing", {}))  # the parts of load_seconds
        session.timing.clear()  # a session reused by a later call does not claim them again
        global STARTED_AT
        if STARTED_AT is not None:  # the CLI: Python's imports and argument handling before this call
            timing["startup_seconds"], STARTED_AT = t_start - STARTED_AT, None
        record = run_record(config, mdl, str(dev), alloc, res, ppl, dense, zs, quant, before_q, timing,
                            req.pruner.needs_data)
        record["fused_kernels"] = dict(fused)
        if run_dir is not None:
            if session.weights is None:
                mdl.to("cpu")
            t_exp = time.perf_counter()
            if session.weights is not None:
                from layerprune.models.streaming import write_from_checkpoints

                run_dir.finalize(mdl, tok, record, writer=lambda m, t, p: write_from_checkpoints(m, t, p, run_dir))
            else:
                run_dir.finalize(mdl, tok, record)
            record["timing"]["export_seconds"] = time.perf_counter() - t_exp
            record["out"] = str(out)
    if keep_model:
        record["_model"] = mdl
        record["_tokenizer"] = tok
    return record


def check_stream(model: Any, out: Any, req: PruneRequest, ev: EvalConfig, dense_ppl: bool, session: Any) -> None:
    """``stream=True`` works from a local safetensors directory into ``--out``; what it cannot do is refused."""
    require(isinstance(model, str) and Path(model).is_dir() and session is None,
            "--stream reads the model from a local Hugging Face directory (safetensors): give its path")
    require(out is not None, "--stream writes each pruned block to --out as it goes: give --out")
    require(req.allocator.name in ("uniform", "dlp", "owl", "svnup"),
            f"--stream supports uniform, dlp, owl and svnup allocation, not {req.allocator.name}")
    require(not req.quantize and not ev.tasks and not dense_ppl,
            "--stream does not combine with --quantize, --tasks or --dense-ppl yet")


def stream_scratch(session: Session, run_dir: RunDir | None, out: Any) -> Path:
    """Where the SV-NUP game of a streamed model writes the pruned copy of every block: inside the run's partial
    folder, removed when the game ends, before the pruning pass writes its checkpoints and the output, so the disk
    must hold the larger of the two."""
    if run_dir is None:  # a data-parallel rank other than the first: no output folder of its own
        import tempfile

        return Path(tempfile.mkdtemp(prefix="layerprune-sv-"))
    copies = sum(p.numel() * p.element_size() for b in session.adapter.blocks for p in b.parameters())
    need = getattr(run_dir, "need", None) or 0
    free = shutil.disk_usage(run_dir.partial).free
    require(free >= 1.02 * max(copies, need),
            f"--out {out}: the streamed SV-NUP game writes a pruned copy of every block ({copies / 2**30:.2f} GiB, "
            f"removed before the pruning writes the run's {need / 2**30:.2f} GiB), but only {free / 2**30:.2f} GiB "
            "are free there: free space or choose another --out")
    return run_dir.partial / "sv_copies"


def streamed_ppl(session: Session, ev: EvalConfig, run_dir: RunDir) -> dict[str, dict]:
    """Perplexity with every block read from its pruned checkpoint, one block at a time."""
    import math

    from layerprune.engine.sequential import sweep_nll
    from layerprune.evaluation.perplexity import eval_windows

    seq = ev.seqlen or session.seqlen
    out = {}
    w = session.weights

    def load_pruned(i: int, block: nn.Module) -> None:  # straight from the pruned checkpoint, not the source
        w.load(i, block, run_dir.block_tensors(i))

    for d in ev.datasets:
        t = time.perf_counter()
        ids = eval_windows(session.tokenizer, d, seq, ev.max_windows, data_dir=session.data_dir)
        tot, cnt = sweep_nll(session.model, session.adapter, ids, session.device, load_pruned, w.release)
        out[d] = {"dataset": d, "ppl": math.exp(tot / cnt), "windows": int(ids.shape[0]), "tokens": int(ids.numel()),
                  "seqlen": seq, "seconds": time.perf_counter() - t, "streamed": True}
        log.info("ppl %s (seqlen %d, %d windows, block by block): %.3f", d, seq, ids.shape[0], out[d]["ppl"])
    return out


def allocate(model: str | nn.Module, *, sparsity: float = 0.7, allocation: str = "dlp", options: Any = None,
             pattern: str = "unstructured", pruner: str = "wanda", pruner_options: Any = None,
             calib: CalibConfig | str | None = None, device: str = "auto", dtype: str = "float32",
             tokenizer: Any = None, trust_remote_code: bool = False, progress: bool = True, use_cache: bool = True,
             allow_long: bool = False, data_dir: str | Path | None = None, **calib_kw: Any) -> dict:
    """Compute (and cache) the per-block sparsities of one allocation method; returns its JSON."""
    req = plan_prune(sparsity, pruner, pattern, allocation, options, pruner_options)
    cal = calib_config(calib, **calib_kw)
    root = resolve_data_dir(data_dir)
    if isinstance(model, str):
        check_model_spec(model)
    dev = resolve_device(init_from_env(device))
    mdl, tok, src = load(model, tokenizer, dtype, trust_remote_code)
    s = Session(mdl, tok, dev, cal, progress=progress, use_cache=use_cache, data_dir=root)
    with fused_ops(mdl, dev):
        alloc = s.allocate(allocation, req.target, req.alloc_options, pruner, req.nm, req.pruner_options, allow_long)
    return {"model": src, "method": allocation, "target": req.target, "per_block": alloc.per_block,
            "block_sizes": s.adapter.block_sizes(), "nm": alloc.nm, "m": alloc.m, **alloc.diagnostics}


def evaluate(model: str | nn.Module, *, ppl: Iterable[str] | None = None, seqlen: int = 2048,
             max_windows: int | None = None, tasks: Iterable[str] = (), limit: int | None = None,
             device: str = "auto", dtype: str = "float32", batch_size: int = 1, tokenizer: Any = None,
             trust_remote_code: bool = False, task_batch_size: int | str = 16,
             data_dir: str | Path | None = None) -> dict:
    """Perplexity (reference protocol) and zero-shot accuracy of a model; the ``eval`` record.

    ``ppl=None`` means WikiText-2 unless ``tasks`` are given, in which case only the tasks run."""
    task_list = tuple(t.strip() for t in tasks if t and t.strip())
    names = ("wikitext2",) if ppl is None and not task_list else tuple(ppl or ())
    require(max_windows is None or max_windows >= 1,
            f"--max-windows must be at least 1 (got {max_windows}); leave it out for all windows")
    require(batch_size >= 1, f"--batch-size must be at least 1 (got {batch_size})")
    ev = EvalConfig(datasets=names, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size,
                    tasks=task_list, limit=limit, task_batch_size=task_batch_size).validate()
    require(seqlen >= 2, f"--seqlen must be at least 2 (got {seqlen})")
    root = resolve_data_dir(data_dir)
    if isinstance(model, str):
        check_model_spec(model)
    dev = resolve_device(device)
    mdl, tok, src = load(model, tokenizer, dtype, trust_remote_code)
    if ev.datasets:
        check_seqlen(mdl, seqlen)
    t = time.perf_counter()
    with fused_ops(mdl, dev) as fused:
        res = evaluate_ppl(mdl, tok, list(ev.datasets), seqlen, ev.max_windows, dev, ev.batch_size, root,
                           flag="--seqlen")
        out: dict[str, Any] = {"model": src, "ppl": {k: v["ppl"] for k, v in res.items()}, "ppl_details": res,
                               "tasks": {}, "device": str(dev), "dtype": dtype, "versions": versions(),
                               "fused_kernels": dict(fused)}
        if ev.tasks:
            from layerprune.evaluation.zeroshot import zero_shot

            zs = zero_shot(mdl, tok, list(ev.tasks), limit=ev.limit, batch_size=ev.task_batch_size, device=dev,
                           data_dir=root)
            out["tasks"] = zs["tasks"]
            out["zero_shot"] = {k: v for k, v in zs.items() if k != "tasks"}
    out["seconds"] = time.perf_counter() - t
    return out


__all__ = ["CalibConfig", "EvalConfig", "PruneRequest", "RunDir", "Session", "allocate", "calib_config",
           "evaluate", "load", "plan_prune", "prune"]
