"""The sequential block-by-block loop (methods_dlp.md §4.4), generic and bounded in accelerator memory.

For each block: move it to the accelerator; run the calibration batches through it once with hooks
that feed every linear's pruner (inputs come from the already-pruned earlier blocks; this forward stops
once the last linear has its input, as its output is not used); prune every
linear with **its own** pattern; run the pruned block once more to produce the next block's inputs;
move it back. Two forwards per block, no more; samples are batched; statistics are fp32 on the
accelerator. ``dense_sweep`` is the one-forward-per-block sweep over the **dense** model, with sinks
supplied by the caller (DLP/OWL's statistics in ``allocation/stats.py``, SV-NUP's pruned copies). The
engine knows no method: pruners come from the registry by name.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from layerprune.distributed import broadcast_tensor, deal, rank, reduce_count, shard, world_size
from layerprune.engine.runner import BlockRunner, StopForward, move_non_block
from layerprune.models.adapter import ModelAdapter
from layerprune.pruners import Pattern, get_pruner
from layerprune.utils import fits_resident, peak_memory_mb, reset_peak, sync

log = logging.getLogger("layerprune")


@contextmanager
def feed_hooks(linears: dict[str, nn.Linear], sinks: dict[str, object],
               groups: dict[str, str] | None = None, stop: bool = False) -> Iterator[None]:
    """Forward pre-hooks that hand each linear's input to ``sinks[name].add_batch``.

    With ``groups`` (a dict to fill), linears that receive the very same input tensor in a forward (q/k/v
    after one norm, gate/up after another) are found on the first batch: ``groups[member] = leader``, and
    from then on only the leader's sink is fed (its statistics are the members' too).

    With ``stop``, the block's forward ends (``StopForward``, caught by :meth:`BlockRunner.run`) as soon as
    every observed linear has had its input: the rest (in a LLaMA block the ``down_proj`` matmul, about a
    fifth of the block's FLOPs, and the residual) would only make an output that nobody reads. Only for a
    forward whose output is discarded (``store=False``)."""
    handles = []
    seen: list[tuple[torch.Tensor, str]] = []  # this forward's inputs (strong refs: identity is reliable)
    fired: set[str] = set()
    state = {"batch": 0}

    def make(name: str, sink: object):
        def hook(mod, args):
            x = args[0]
            if name in fired:  # a linear's second input: the next batch's forward (not the first in module order:
                state["batch"] += 1  # OPT's attention defines k_proj first and calls q_proj first)
                seen.clear()
                fired.clear()
            fired.add(name)
            done = stop and len(fired) == len(handles)
            if groups is not None:
                leader = next((n for t, n in seen if t is x), None)
                if state["batch"] == 0 and leader is not None:
                    groups[name] = leader
                if groups.get(name) is not None:
                    if leader != groups[name]:
                        raise RuntimeError(f"{name} no longer shares its input with {groups[name]}")
                    if done:
                        raise StopForward
                    return
                seen.append((x, name))
            sink.add_batch(x.detach())
            if done:
                raise StopForward

        return hook

    for name, lin in linears.items():
        if name in sinks:  # a linear without a sink runs unobserved
            handles.append(lin.register_forward_pre_hook(make(name, sinks[name])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        seen.clear()


def model_bytes_off(model: nn.Module, device: torch.device) -> int:
    """Bytes of ``model``'s parameters and buffers not yet on ``device``."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen and t.device != device:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def decide_resident(model: nn.Module, adapter: ModelAdapter, device: torch.device, weights: object = None,
                    resident: bool | None = None) -> bool:
    """Whether the whole model stays on the accelerator for a pass (``resident=None``: when it fits).

    A resident model moves to the GPU once instead of every block twice per pass (a 7B block takes 81 ms
    to copy in from pageable memory on the H200, BENCHMARKS.md); it fits when its bytes plus
    eight blocks' worth of working memory (Hessians, scores, activations) stay under 80% of free memory.
    Streamed models (``weights``) and CPU runs never are."""
    if device.type != "cuda" or weights is not None:
        return False
    if resident is not None:
        return resident
    block = sum(p.numel() * p.element_size() for p in adapter.blocks[0].parameters())
    free, _ = torch.cuda.mem_get_info(device)
    off = model_bytes_off(model, device)
    fits = fits_resident(off, block, free)
    log.info("weights %s the GPU for this pass (%.1f GiB to move, %.1f GiB free)",
             "kept on" if fits else "streamed block by block to", off / 2**30, free / 2**30)
    return fits


def reduce_stats(sinks: dict[str, object]) -> None:
    """Data-parallel runs: sum every accumulator over the ranks (no-op in one process)."""
    for s in sinks.values():
        red = getattr(s, "reduce", None)
        if red is not None:
            red()


@dataclass
class PruneResult:
    per_linear: dict[str, dict] = field(default_factory=dict)
    per_block: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    calib_tokens: int = 0
    block_forwards: int = 0  # block forwards over the whole calibration set (two per block, one for the last)
    peak_mem_mb: float | None = None

    def achieved(self) -> float:
        z = sum(v["zeros"] for v in self.per_linear.values())
        n = sum(v["numel"] for v in self.per_linear.values())
        return z / max(n, 1)


class Checkpointer:
    """Protocol of the resume store (see export.RunDir): finished blocks, their weights and records."""

    done: int = 0

    def load_block(self, i: int, block: nn.Module) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def save_block(self, i: int, block: nn.Module, record: dict) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def _solve_order(names: list[str], groups: dict[str, str], grouped: bool) -> list[list[str]]:
    """The linears in module order, those sharing one input together when the pruner solves groups."""
    if not grouped:
        return [[n] for n in names]
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(groups.get(n, n), []).append(n)
    return list(out.values())


def _solve_cost(lins: list[nn.Linear]) -> float:
    """Relative cost of pruning linears that share one input (an OBS solve: one in³ inverse plus rows × in²
    of updates); what dealing them over the ranks balances."""
    k = float(lins[0].in_features)
    return k**3 + sum(lin.out_features for lin in lins) * k**2


def _linear_record(lin: nn.Linear, pattern: Pattern) -> dict:
    zeros = int((lin.weight.data == 0).sum())
    numel = lin.weight.numel()
    return {"allocated": pattern.sparsity, "pattern": str(pattern) if pattern.is_nm else "unstructured",
            "achieved": zeros / numel, "zeros": zeros, "numel": numel}


def prune_sequential(model: nn.Module, adapter: ModelAdapter, calib_ids: torch.Tensor | None,
                     plan: dict[str, Pattern], pruner: str, device: torch.device, batch_size: int = 8,
                     offload: str = "auto", checkpoint: Checkpointer | None = None, progress: bool = True,
                     pruner_kwargs: object = None,
                     on_block: Callable[[int, dict], None] | None = None, weights: object = None,
                     resident: bool | None = None) -> PruneResult:
    """Prune ``model`` in place; ``plan`` maps each linear's full name to its :class:`Pattern`.
    ``pruner_kwargs``: the pruner's options (its dataclass, or a dict of its fields; ``None`` = defaults).
    ``weights`` (``models.streaming.BlockWeights``): blocks start empty and are read before they run and
    released once checkpointed, so host memory holds about one block (needs ``checkpoint``).
    ``resident``: keep the whole model on the accelerator (None: when it fits, :func:`decide_resident`);
    a resident model is left there, otherwise each block returns to the CPU once pruned."""
    cls = get_pruner(pruner)
    pk = cls.make_options(pruner_kwargs)
    res = PruneResult()
    reset_peak(device)
    t_all = time.perf_counter()
    runner = None
    keep = decide_resident(model, adapter, device, weights, resident)
    if keep:
        model.to(device)
    if cls.needs_data:
        assert calib_ids is not None, "this pruner needs calibration data"
        runner = BlockRunner(model, adapter, shard(calib_ids), device, batch_size, offload)
        res.calib_tokens = reduce_count(runner.tokens(), device)
    done = checkpoint.done if checkpoint is not None else 0
    bar = tqdm(range(adapter.n_blocks), desc="prune", disable=not progress, unit="block")
    for i in bar:
        t0 = time.perf_counter()
        block = adapter.blocks[i]
        if weights is not None:
            weights.load(i, block)
        block.to(device)
        linears = adapter.linears(i)
        if i < done:
            rec = checkpoint.load_block(i, block)  # type: ignore[union-attr]
            if runner is not None and i + 1 < adapter.n_blocks:
                runner.run(i, store=True)  # regenerate the next block's inputs from the saved pruned block
                res.block_forwards += 1
            res.per_linear.update(rec["linears"])
            res.per_block.append(rec["block"])
            if device.type == "cuda" and not keep:
                block.to("cpu")
            if weights is not None:
                weights.release(i, block)
            bar.set_postfix_str(f"block {i} resumed")
            continue
        pruners = {n: cls.make(lin, pk) for n, lin in linears.items()}
        groups: dict[str, str] = {}
        if runner is not None:
            share = groups if hasattr(cls.cls, "share_from") else None
            with feed_hooks(linears, pruners, share, stop=True):
                runner.run(i, store=False)
            res.block_forwards += 1
            reduce_stats({n: p for n, p in pruners.items() if n not in groups})
            for member, leader in groups.items():
                pruners[member].share_from(pruners[leader])
        sync(device)
        t_mask = time.perf_counter()
        recs = {}
        order = _solve_order(list(linears), groups, hasattr(cls.cls, "prune_group"))
        owner = deal([_solve_cost([linears[n] for n in names]) for names in order], world_size())
        for names, who in zip(order, owner):
            if who == rank():  # data-parallel: each rank solves its share of the block's linears
                pats = [plan[adapter.full_name(i, n)] for n in names]
                if len(names) > 1:
                    cls.cls.prune_group([pruners[n] for n in names], pats)
                else:
                    pruners[names[0]].prune(pats[0])
            for n in names:
                pruners[n].free()
        for names, who in zip(order, owner):
            for n in names:
                broadcast_tensor(linears[n].weight.data, who)  # every rank continues with the same block
                recs[adapter.full_name(i, n)] = _linear_record(linears[n], plan[adapter.full_name(i, n)])
        sync(device)
        prune_s = time.perf_counter() - t_mask
        del pruners
        if runner is not None and i + 1 < adapter.n_blocks:
            runner.run(i, store=True)
            res.block_forwards += 1
        numel = sum(r["numel"] for r in recs.values())
        brec = {"block": i,
                "allocated": sum(r["allocated"] * r["numel"] for r in recs.values()) / numel,
                "achieved": sum(r["zeros"] for r in recs.values()) / numel,
                "seconds": time.perf_counter() - t0, "prune_seconds": prune_s,
                "peak_mem_mb": peak_memory_mb(device)}
        if device.type == "cuda" and not keep:
            block.to("cpu")
        res.per_linear.update(recs)
        res.per_block.append(brec)
        if checkpoint is not None:
            checkpoint.save_block(i, block, {"linears": recs, "block": brec})
        if weights is not None:
            weights.release(i, block)
        if on_block:
            on_block(i, brec)
        bar.set_postfix_str(f"s={brec['achieved']:.3f}")
    if runner is not None:
        runner.free()
    res.seconds = time.perf_counter() - t_all
    res.peak_mem_mb = peak_memory_mb(device)
    return res


def dense_sweep(model: nn.Module, adapter: ModelAdapter, calib_ids: torch.Tensor | None, device: torch.device,
                make_sinks: Callable[[int, dict[str, nn.Linear]], dict], on_block: Callable[[int, dict, dict], None],
                batch_size: int = 8, offload: str = "auto", progress: bool = True, desc: str = "dense sweep",
                weights: object = None, resident: bool | None = None) -> dict:
    """One forward per **dense** block (§1.6 pass 1): hooks feed ``make_sinks(i, linears)`` while the
    block's outputs become the next block's inputs; then ``on_block(i, linears, sinks)`` (which may
    compute pruned copies, but must leave the dense weights in place). Without ``calib_ids`` no data runs.
    ``resident`` as in :func:`prune_sequential`. Returns where the time went, in seconds: the model's move
    and the input capture, the forwards (with the sinks' hooks; as the host saw them), ``on_block``, and each
    block's forwards and ``on_block`` together (``per_block_s``, the device's work finished)."""
    t_start = time.perf_counter()
    times: dict = {"capture_s": 0.0, "forwards_s": 0.0, "on_block_s": 0.0, "per_block_s": []}
    keep = decide_resident(model, adapter, device, weights, resident)
    if keep:
        model.to(device)
    runner = BlockRunner(model, adapter, shard(calib_ids), device, batch_size, offload) if calib_ids is not None else None
    times["capture_s"] = time.perf_counter() - t_start
    for i in tqdm(range(adapter.n_blocks), desc=desc, disable=not progress, unit="block"):
        block = adapter.blocks[i]
        if weights is not None:
            weights.load(i, block)
        block.to(device)
        linears = adapter.linears(i)
        sinks = make_sinks(i, linears)
        t0 = time.perf_counter()
        if runner is not None:
            share = all(hasattr(x, "share_from") for x in sinks.values())
            groups: dict[str, str] = {}
            with feed_hooks(linears, sinks, groups if share else None):
                runner.run(i, store=True)
            reduce_stats({n: x for n, x in sinks.items() if n not in groups})
            for member, leader in groups.items():
                sinks[member].share_from(sinks[leader])
        t1 = time.perf_counter()
        on_block(i, linears, sinks)
        sync(device)
        t2 = time.perf_counter()
        times["forwards_s"] += t1 - t0  # the host's share: the device finishes them during on_block's sync
        times["on_block_s"] += t2 - t1
        times["per_block_s"].append(round(t2 - t0, 4))
        if device.type == "cuda" and not keep:
            block.to("cpu")
        if weights is not None:
            weights.release(i, block)
    if runner is not None:
        runner.free()
    if device.type == "cuda" and not keep:
        move_non_block(model, adapter, torch.device("cpu"))
    times["total_s"] = time.perf_counter() - t_start
    return times


@contextmanager
def block_read(i: int, block: nn.Module, device: torch.device, load: Callable[[int, nn.Module], None],
               release: Callable[[int, nn.Module], None]) -> Iterator[nn.Module]:
    """Block ``i`` of a model whose blocks live on disk, for one run: read by ``load``, moved to ``device``,
    and dropped by ``release`` afterwards (also when the run fails)."""
    load(i, block)
    try:
        block.to(device)
        yield block
    finally:
        release(i, block)


@torch.no_grad()
def sweep_nll(model: nn.Module, adapter: ModelAdapter, ids: torch.Tensor, device: torch.device,
              load: Callable[[int, nn.Module], None], release: Callable[[int, nn.Module], None],
              batch_size: int = 1, head_tokens: int = 2**22) -> tuple[float, int]:
    """Summed next-token NLL of ``ids`` with the model run block by block (each block read by ``load`` and
    dropped by ``release``): perplexity for a model that fits neither the GPU nor host memory."""
    runner = BlockRunner(model, adapter, ids, device, batch_size, offload="auto")
    for i in range(adapter.n_blocks):
        with block_read(i, adapter.blocks[i], device, load, release):
            runner.run(i, store=True)
    move_non_block(model, adapter, device)
    tot, cnt = 0.0, 0
    bs = runner.batch_size
    for b, h in enumerate(runner.hidden()):
        s, c = runner.head_nll(b, h.to(device), ids[b * bs : (b + 1) * bs].to(device), head_tokens)
        tot, cnt = tot + float(s), cnt + c
    runner.free()
    move_non_block(model, adapter, torch.device("cpu"))
    return tot, cnt
