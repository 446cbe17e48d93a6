"""SV-NUP — Shapley-value non-uniform pruning (Sun, Yu, Cui, Li 2025, arXiv 2505.01731v3).

Reconstructed as in methods_svnup.md (no code or paper body is public); every open choice is a
switch. The game (§1.3): players are the decoder blocks; a member block is dense (D), a non-member
is pruned to the target by the base pruner (P, ``absent="pruned"``) or skipped (R, ``"removed"``);
blocks outside the window are dense or pruned (``background``); the payoff is −mean token NLL
(``payoff="nll"``) or −perplexity (``"ppl"``) on ``sv_samples`` C4 windows disjoint from the
pruning calibration set. SWSV (§1.5) evaluates (L − w + 1)(2^w − 1) + 1 coalitions for stride-1
windows. Cost tricks: each block's pruned copy is computed once and a coalition only swaps weight
tensors; the hidden state entering each window is cached so only blocks from the window on run.
A streamed model (``--stream``: blocks read from safetensors as needed) plays the same game with the pruned
copies in a scratch folder on disk and each block read, run over every SV batch, and dropped; a window is
played breadth first, so it reads each player twice and each later block once (bit-identical payoffs).
Budgets (§1.6): band ``s = p − 2λ(φ̃ − mean φ̃)`` (φ̃ = minmax φ) or proportional density, then
clip to [0, 0.99] and restore the parameter-weighted mean.

Default game: D/P with the background pruned, chosen on C4 held-out perplexity at 70% over SmolLM2,
Gemma3 and Qwen2.5 with Wanda and SparseGPT (BENCHMARKS.md, SV-NUP): better than a dense background
on average (2.9% over six model × base cells, a near tie except on Qwen2.5-Wanda) and 20% better than
removing blocks (D/R).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from layerprune.allocation.common import AllocContext, Allocation, band_from_importance, finish
from layerprune.allocation.shapley import exact_shapley, monte_carlo_shapley, swsv, swsv_evaluations, window_starts
from layerprune.distributed import alone, deal, rank, world_size
from layerprune.engine.runner import BlockRunner, move_non_block
from layerprune.engine.sequential import Checkpointer, block_read, dense_sweep, prune_sequential
from layerprune.errors import UserError
from layerprune.options import option
from layerprune.pruners import Pattern, get_pruner
from layerprune.specs import AllocatorSpec
from layerprune.utils import tf32

log = logging.getLogger("layerprune")

STATES = ("D", "P", "R")


class ScratchBlocks(Checkpointer):
    """The pruned copy of every block of a streamed model, one safetensors file per block in ``directory``:
    written once by the copies' pass (the engine's checkpoint protocol), read whenever a block runs pruned."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.done = 0

    def save_block(self, i: int, block: nn.Module, record: dict | None = None) -> None:
        from safetensors.torch import save_file

        tmp = self.dir / f"block_{i}.tmp"
        save_file({n: p.detach().cpu().contiguous() for n, p in block.named_parameters()}, str(tmp))
        tmp.replace(self.dir / f"block_{i}.safetensors")

    def read(self, i: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.dir / f"block_{i}.safetensors"))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def deal_windows(starts: list[int], first_blocks: list[int], n_blocks: int, ranks: int) -> list[set[int]]:
    """Windows for each rank, balanced by cost: a window's coalitions run the blocks from its first block to
    the last, so its cost is ``n_blocks − first``; longest first, each to the least-loaded rank (ties: lowest
    rank). Deterministic, so every rank computes the same deal. Measured on 2 H200s (BENCHMARKS.md, "Several
    GPUs"): 226/210 evaluations and 1.96× at 32 blocks; 46/30 and 1.71× at 8 blocks (five windows)."""
    costs = [n_blocks - first for first in first_blocks]
    # longest first; among equal costs the earlier window first (the order deal() breaks ties by)
    out: list[set[int]] = [set() for _ in range(ranks)]
    for st, r in zip(starts, deal(costs, ranks)):
        out[r].add(st)
    return out


class SVGame:
    """The block game on one model: weight copies, cached SV-set inputs, and the payoff."""

    def __init__(self, model: nn.Module, adapter, sv_ids: torch.Tensor, calib_ids: torch.Tensor | None,
                 target: float, pruner: str, device: torch.device, background: str = "pruned",
                 absent: str = "pruned", payoff: str = "nll", batch_size: int = 8, progress: bool = True,
                 pruner_kwargs: object = None, use_tf32: bool = True, head_tokens: int | None = None,
                 copies_on_device: bool | None = None, weights: object = None,
                 scratch: str | Path | None = None) -> None:
        """``copies_on_device``: keep the dense and pruned copy of every linear on the accelerator (fast state
        switches; three weights' worth of memory) or keep them in (pinned) host memory and copy a block's
        version into one device buffer per linear when its state changes (one weight's worth). ``None``: on
        the device when both copies fit in 60% of the free accelerator memory.

        ``weights`` (``models.streaming.BlockWeights``, a streamed model whose blocks start empty): the pruned
        copies go to ``scratch`` on disk, and every block run reads the block in its state (dense from the
        checkpoint, pruned from ``scratch``), runs it over every SV batch and drops it, so host and accelerator
        memory hold one block besides the SV activations of a window's 2^w coalitions."""
        if background not in ("dense", "pruned"):
            raise UserError("--background must be dense or pruned")
        if absent not in ("pruned", "removed"):
            raise UserError("--absent must be pruned or removed")
        if payoff not in ("nll", "ppl"):
            raise UserError("--payoff must be nll or ppl")
        self.model, self.adapter, self.device = model, adapter, device
        self.background, self.absent, self.payoff_kind = background, absent, payoff
        self.sv_ids = sv_ids.to(device)  # once: the payoff slices it every evaluation
        # positions per head call: about 1 GiB of fp32 logits (2**28 values) unless given
        head = model.get_output_embeddings()
        vocab = head.weight.shape[0] if head is not None else getattr(model.config, "vocab_size", 50_000)
        self.head_tokens = head_tokens or max(1, 2**28 // vocab)
        self.tf32 = use_tf32 and device.type == "cuda"
        self.evaluations = 0
        L = adapter.n_blocks
        self.dense: list[dict[str, torch.Tensor]] = []
        self.pruned: list[dict[str, torch.Tensor]] = []
        self.weights, self.scratch = weights, None
        self.block_reads = 0  # a streamed model: blocks read from disk by the game
        self.window_tree = True  # play a window's coalitions as one tree (play_window); False: one by one
        self.bg_state = "D" if background == "dense" else "P"
        self.absent_state = "P" if absent == "pruned" else "R"
        if weights is not None:
            if scratch is None:
                raise UserError("the SV-NUP game of a streamed model needs a scratch folder for its pruned copies")
            self.scratch = ScratchBlocks(Path(scratch) / f"rank{rank()}" if world_size() > 1 else Path(scratch))
        if absent == "pruned" or background == "pruned":
            # every rank makes the copies by itself (all calibration samples, no collectives): data-parallel
            # statistics are summed in another order and flip a few mask decisions, which would make φ depend
            # on the number of processes; this way φ is the one-process φ bit for bit (tests/test_distributed.py)
            with alone():
                self._make_pruned_copies(calib_ids, target, pruner, batch_size, progress,
                                         get_pruner(pruner).make_options(pruner_kwargs))
        elif weights is None:
            self.dense = [{n: lin.weight.data for n, lin in adapter.linears(i).items()} for i in range(L)]
        if weights is not None:  # blocks stay empty: each run reads its block (_stream_many)
            self.copies_on_device = False
            self.runner = BlockRunner(model, adapter, sv_ids, device, batch_size, offload="device")
            self.state = ["D"] * L
            return
        self.host_dense = self.dense  # the dense weights the model gets back on close()
        if copies_on_device is None:
            need = sum(t.numel() * t.element_size() for d in self.dense + self.pruned for t in d.values())
            copies_on_device = device.type != "cuda" or need < 0.6 * torch.cuda.mem_get_info(device)[0]
        self.copies_on_device = copies_on_device
        self.runner = BlockRunner(model, adapter, sv_ids, device, batch_size, offload="device")
        self.runner.place()
        if copies_on_device:
            self.dense = [{n: t.to(device) for n, t in d.items()} for d in self.dense]
            self.pruned = [{n: t.to(device) for n, t in d.items()} for d in self.pruned]
        else:
            log.info("SV-NUP: the dense and pruned copies stay in host memory; a block's version is copied to the "
                     "accelerator when its state changes")
            pin = device.type == "cuda"
            self.dense = [{n: t.pin_memory() if pin else t.clone() for n, t in d.items()} for d in self.dense]
            self.pruned = [{n: t.pin_memory() if pin else t.clone() for n, t in d.items()} for d in self.pruned]
            for i in range(L):  # one device buffer per linear, filled by _apply
                for n, lin in adapter.linears(i).items():
                    lin.weight.data = torch.empty_like(self.dense[i][n], device=device)
        self.state = ["D"] * L
        self._apply(["D"] * L, force=True)

    # -------------------------------------------------------------- weight copies
    @torch.no_grad()
    def _make_pruned_copies(self, calib_ids, target, pruner, batch_size, progress, pk) -> None:
        """Every block's P copy: from the standard sequential uniform-p pass (background pruned: inputs from
        pruned blocks) or from the engine's dense sweep, whose pruners see dense-model inputs (background
        dense). In memory the copies are cloned and the dense weights put back bit-exactly; a streamed model's
        go to ``scratch`` on disk as each block finishes (the blocks are dropped anyway)."""
        ad, dev, cls = self.adapter, self.device, get_pruner(pruner)
        if calib_ids is None and cls.needs_data:
            raise UserError(f"the {pruner} pruner needs calibration data for the SV game")
        streamed = self.weights is not None
        if not streamed:
            self.dense = [{n: lin.weight.data.clone() for n, lin in ad.linears(i).items()} for i in range(ad.n_blocks)]
        if self.background == "pruned":
            plan = {ad.full_name(i, n): Pattern(target) for i in range(ad.n_blocks) for n in ad.linear_names[i]}
            prune_sequential(self.model, ad, calib_ids, plan, pruner, dev, batch_size, checkpoint=self.scratch,
                             progress=progress, pruner_kwargs=pk, weights=self.weights)
            if not streamed:
                self.pruned = [{n: lin.weight.data.clone() for n, lin in ad.linears(i).items()}
                               for i in range(ad.n_blocks)]
        else:
            def keep_pruned(i: int, lins: dict, prs: dict) -> None:
                for n in lins:
                    prs[n].prune(Pattern(target))
                    prs[n].free()
                if streamed:
                    self.scratch.save_block(i, ad.blocks[i])  # type: ignore[union-attr]
                    return
                self.pruned.append({n: lin.weight.data.clone() for n, lin in lins.items()})
                for n, lin in lins.items():  # the sweep goes on with the dense weights
                    lin.weight.data = self.dense[i][n].clone()

            dense_sweep(self.model, ad, calib_ids if cls.needs_data else None, dev,
                        lambda i, lins: {n: cls.make(lin, pk) for n, lin in lins.items()}, keep_pruned, batch_size,
                        progress=progress, desc="SV: pruned copies", weights=self.weights)
        if not streamed:
            for i in range(ad.n_blocks):  # restore the dense weights bit-exactly
                for n, lin in ad.linears(i).items():
                    lin.weight.data = self.dense[i][n]

    def _run(self, hidden: list[torch.Tensor], start: int, stop: int, states: list[str]) -> list[torch.Tensor]:
        """Every batch's hidden state through blocks ``start .. stop-1`` in ``states`` (R: left out). In memory
        batch by batch; a streamed model block by block, each block read in its state, run over every batch
        and dropped (the same operations on the same inputs, so the same outputs)."""
        if self.weights is None:
            self._apply(states)
            skip = frozenset(i for i in range(start, stop) if states[i] == "R")
            return [self.runner.forward(b, x, start, stop, skip=skip) for b, x in enumerate(hidden)]
        return self._stream_many([hidden], start, stop, states)[0]

    def _stream_many(self, entries: list[list[torch.Tensor]], start: int, stop: int,
                     states: list[str]) -> list[list[torch.Tensor]]:
        """A streamed model: several coalitions' hidden states (``entries``, each one tensor per batch) through
        blocks ``start .. stop-1`` in ``states``, each block read once (dense from the checkpoint, pruned from the
        scratch), run over every entry and batch, and dropped."""
        w, scratch = self.weights, self.scratch
        out = [list(h) for h in entries]
        for i in range(start, stop):
            if states[i] == "R":
                continue
            pruned = scratch.read(i) if states[i] == "P" else None  # type: ignore[union-attr]
            with block_read(i, self.adapter.blocks[i], self.device, lambda j, blk: w.load(j, blk, pruned),
                            w.release):  # type: ignore[union-attr]
                out = [[self.runner.forward(b, x, i, i + 1) for b, x in enumerate(h)] for h in out]
            self.block_reads += 1
        return out

    def _apply(self, states: list[str], force: bool = False) -> None:
        for i, st in enumerate(states):
            if st == self.state[i] and not force:
                continue
            if st in ("D", "P"):
                src = self.dense[i] if st == "D" else self.pruned[i]
                for n, lin in self.adapter.linears(i).items():
                    if self.copies_on_device:
                        lin.weight.data = src[n]
                    else:
                        lin.weight.data.copy_(src[n], non_blocking=True)
            self.state[i] = st

    # -------------------------------------------------------------- payoff
    @torch.no_grad()
    def run_from(self, start: int, hidden: list[torch.Tensor], states: list[str]) -> float:
        """Payoff of the model in ``states``, running blocks ``start..L-1`` from cached ``hidden``.

        On CUDA the coalition forwards use TF32 matmuls by default (``fp32=False``; ~3x faster in fp32,
        payoff error ~1e-4 nats, far below the differences between coalitions)."""
        with tf32(self.tf32 or torch.backends.cuda.matmul.allow_tf32):
            if self.weights is not None:
                return self._payoff(enumerate(self._run(hidden, start, self.adapter.n_blocks, states)))
            self._apply(states)
            skip = frozenset(i for i, st in enumerate(states) if st == "R")
            return self._payoff((b, self.runner.forward(b, h, start, skip=skip)) for b, h in enumerate(hidden))

    def _payoff(self, outputs) -> float:
        """One evaluation's payoff from the last block's output of each batch, ``(b, x)`` pairs (consumed one
        at a time): −mean NLL (``nll``) or −perplexity (``ppl``) of the SV windows."""
        tot, cnt = torch.zeros((), dtype=torch.float64, device=self.device), 0
        bs = self.runner.batch_size
        for b, x in outputs:
            s, c = self.runner.head_nll(b, x, self.sv_ids[b * bs : (b + 1) * bs], self.head_tokens)
            tot, cnt = tot + s, cnt + c
        self.evaluations += 1
        nll = float(tot) / cnt
        return -nll if self.payoff_kind == "nll" else -math.exp(nll)

    @torch.no_grad()
    def play_window(self, players: list[int], active: list[int], hidden: list[torch.Tensor],
                    skip: frozenset | None = None) -> dict[frozenset, float]:
        """Payoffs of every coalition of the window ``active`` (player indices) but ``skip`` (the pattern
        shared by all windows, evaluated once elsewhere), from ``hidden`` entering its first player block.

        The coalitions form a binary tree over the window's players: the hidden state after the first
        player is computed once per state of that player (2 forwards), after the second once per pair
        (4), and so on, a depth-first walk holding one state per level; only the blocks after the window
        run once per coalition. Each block sees exactly the inputs and weights it sees in
        :meth:`run_from`, so the payoffs are identical; for w = 4 a window costs 2 + 4 + 8 + 16 = 30 block
        runs instead of 4 × 16 = 64 before its tail (about 12% of a 32-block game)."""
        if self.weights is not None:
            return self._play_window_streamed(players, active, hidden, skip)
        L = self.adapter.n_blocks
        w = len(active)
        blocks = [players[p] for p in active]
        bg = self.bg_state
        out: dict[frozenset, float] = {}
        choice: list[str] = []

        def segment(h: list[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
            states = list(self.state)
            for i in range(start, stop):
                states[i] = bg
            for j, c in enumerate(choice):
                states[blocks[j]] = c
            return self._run(h, start, stop, states)

        def walk(j: int, h: list[torch.Tensor], members: frozenset) -> None:
            if j == w:  # a leaf: the blocks after the window, then the payoff
                out[members] = self._payoff(enumerate(segment(h, blocks[-1] + 1, L)))
                return
            start = blocks[j - 1] + 1 if j else blocks[0]
            for c, m in (("D", members | {active[j]}), (self.absent_state, members)):
                if j == w - 1 and m == skip:  # the shared pattern's leaf: evaluated once elsewhere
                    continue
                choice.append(c)
                walk(j + 1, segment(h, start, blocks[j] + 1), m)
                choice.pop()

        with tf32(self.tf32 or torch.backends.cuda.matmul.allow_tf32):
            walk(0, hidden, frozenset())
        return out

    @torch.no_grad()
    def _play_window_streamed(self, players: list[int], active: list[int], hidden: list[torch.Tensor],
                              skip: frozenset | None) -> dict[frozenset, float]:
        """:meth:`play_window` for a streamed model, breadth first: the tree's level j holds the hidden states
        of every choice for the first j players, so each block is read once per state per window (a player
        twice, D and absent; a block after the window once, for all 2^w coalitions together) instead of once
        per block run. Memory: 2^w coalitions' SV activations. The same operations on the same inputs as the
        depth-first walk, so the same payoffs."""
        L = self.adapter.n_blocks
        blocks = [players[p] for p in active]
        bg = self.bg_state
        level: list[tuple[frozenset, list[torch.Tensor]]] = [(frozenset(), list(hidden))]
        with tf32(self.tf32 or torch.backends.cuda.matmul.allow_tf32):
            for j, blk in enumerate(blocks):
                st = [bg] * L
                start = blocks[j - 1] + 1 if j else blk
                if start < blk:  # blocks between two players, in the background state
                    level = list(zip([m for m, _ in level], self._stream_many([h for _, h in level], start, blk, st)))
                nxt: list[tuple[frozenset, list[torch.Tensor]]] = []
                for c, present in (("D", True), (self.absent_state, False)):
                    kids = [(m | {active[j]} if present else m, h) for m, h in level]
                    kids = [(m, h) for m, h in kids if not (j == len(blocks) - 1 and m == skip)]
                    if kids:
                        st[blk] = c
                        nxt += zip([m for m, _ in kids], self._stream_many([h for _, h in kids], blk, blk + 1, st))
                level = nxt
            tails = self._stream_many([h for _, h in level], blocks[-1] + 1, L, [bg] * L)
            return {m: self._payoff(enumerate(h)) for (m, _), h in zip(level, tails)}

    @torch.no_grad()
    def advance(self, hidden: list[torch.Tensor], i: int) -> list[torch.Tensor]:
        """Hidden states after block ``i`` in its background state (the prefix cache)."""
        st = list(self.state)
        st[i] = self.bg_state
        return self._run(hidden, i, i + 1, st)

    def states_for(self, players: list[int], members: frozenset, active: list[int]) -> list[str]:
        """Background everywhere; ``active`` players present if in ``members``, else absent."""
        st = [self.bg_state] * self.adapter.n_blocks
        for p in active:
            st[players[p]] = "D" if p in members else self.absent_state
        return st

    # -------------------------------------------------------------- estimators
    def swsv(self, players: list[int], window: int, aggregate: str = "center", stride: int = 1,
             weights: str = "shapley", progress: bool = True) -> tuple[np.ndarray, int]:
        """SWSV over ``players``. Under ``torch.distributed`` the windows are dealt to the ranks by cost (:func:`deal_windows`):
        each rank plays its windows' coalitions (advancing its own prefix cache), the payoffs are gathered
        with one ``all_gather_object``, and every rank assembles the same φ from the same table."""
        n = len(players)
        shared = frozenset(range(window)) if self.bg_state == "D" else (
            frozenset() if self.absent_state == self.bg_state else None)
        total = swsv_evaluations(n, window, stride, shared is not None)
        starts = window_starts(n, window, stride)
        mine = deal_windows(starts, [players[st] for st in starts], self.adapter.n_blocks, world_size())[rank()]
        bar = tqdm(total=total if world_size() == 1 else None, desc=f"SV-NUP SWSV (w={window})",
                   disable=not progress, unit="eval")
        state = {"cursor": 0, "hidden": self.runner.hidden()}  # hidden = input of block `cursor`
        table: dict[tuple[int, frozenset], float] = {}

        def play(st: int, members: frozenset) -> float:
            if st not in mine:
                return float("nan")  # another rank plays this window
            first = players[st]
            while state["cursor"] < first:
                state["hidden"] = self.advance(state["hidden"], state["cursor"])
                state["cursor"] += 1
            if (st, members) not in table:
                active = list(range(st, st + window))
                skip = frozenset(st + j for j in shared) if shared is not None else None  # evaluated once
                if self.window_tree and members != skip:
                    vals = self.play_window(players, active, state["hidden"], skip)
                    table.update({(st, m): v for m, v in vals.items()})
                    bar.update(len(vals))
                else:
                    table[(st, members)] = self.run_from(first, state["hidden"], self.states_for(players, members, active))
                    bar.update(1)
            return table[(st, members)]

        phi, evals, _ = swsv(n, window, play, aggregate, stride, shared, weights)
        bar.close()
        if world_size() > 1:
            import torch.distributed as dist

            parts: list[dict] = [{} for _ in range(world_size())]
            dist.all_gather_object(parts, table)
            for part in parts:
                table.update(part)
            self.evaluations_per_rank = [len(p) for p in parts]
            phi, evals, _ = swsv(n, window, lambda st, m: table[(st, m)], aggregate, stride, shared, weights)
        if evals != total:
            raise RuntimeError(f"SWSV made {evals} evaluations, expected E(L, w) = {total}")
        return phi, evals

    def reference(self, players: list[int], method: str = "exact", permutations: int = 100, seed: int = 0,
                  progress: bool = True) -> tuple[np.ndarray, int]:
        """Exact (2^n) or permutation Monte-Carlo Shapley over ``players``; the rest at background."""
        hidden = self.runner.hidden()
        for i in range(players[0]):
            hidden = self.advance(hidden, i)
        memo: dict[frozenset, float] = {}
        before = self.evaluations
        active = list(range(len(players)))

        def v(S: frozenset) -> float:
            if S not in memo:
                memo[S] = self.run_from(players[0], hidden, self.states_for(players, S, active))
            return memo[S]

        if method == "exact":
            phi = exact_shapley(len(players), v)
        else:
            phi = monte_carlo_shapley(len(players), v, permutations, seed)
        return phi, self.evaluations - before

    def restore_dense(self) -> None:
        if self.weights is None:  # a streamed model's blocks are empty between runs: nothing to restore
            self._apply(["D"] * self.adapter.n_blocks, force=True)

    def close(self) -> None:
        if self.weights is not None:
            self.runner.free()
            self.scratch.remove()  # type: ignore[union-attr]
            if self.device.type == "cuda":
                move_non_block(self.model, self.adapter, torch.device("cpu"))
            return
        self.restore_dense()
        if not self.copies_on_device:  # the model gets its own dense weights back, not the device buffers
            for i in range(self.adapter.n_blocks):
                for n, lin in self.adapter.linears(i).items():
                    lin.weight.data = self.host_dense[i][n]
        self.runner.free()
        self.pruned = []


def svnup_sparsities(phi: np.ndarray, target: float, lam: float = 0.08, mapping: str = "band") -> np.ndarray:
    """Unclipped budgets from Shapley values (higher φ = more important = less sparsity)."""
    phi = np.asarray(phi, dtype=np.float64)
    if mapping == "band":
        s = band_from_importance(phi, target, 2 * lam)
        return np.full(len(phi), target) if s is None else s
    if mapping == "proportional":
        eps = 1e-3 * max(phi.max(), 1e-12)
        f = np.maximum(phi, eps)
        k = (1 - target) * f / f.mean()
        return 1 - k
    raise UserError("--mapping must be band or proportional")


def estimate_seconds(model: nn.Module, tokens: int, evaluations: int, device: torch.device) -> float:
    """Rough game time: every evaluation counted as a full forward (2·params FLOP per token) at an effective
    rate measured end to end: 8.2e14 on an H200 in bf16 (LLaMA-2-7B dims, 436 evaluations of 16,384 tokens in
    118 s, BENCHMARKS.md "Several GPUs"; a coalition runs only the blocks from its window on, about half the
    model, hence above the matmul peak), 3.8e13 on an H100 in fp32 with TF32 (smollm2); the CPU figure is a guess."""
    params = sum(p.numel() for p in model.parameters())
    half = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32) in (torch.bfloat16,
                                                                                                  torch.float16)
    rate = (8e14 if half else 3e13) if device.type == "cuda" else 5e10
    return evaluations * 2 * params * tokens / rate


@dataclass(frozen=True)
class SVNUPOptions:
    window: int = option(4, "SV-NUP sliding window w (SWSV: (L−w+1)(2^w−1)+1 evaluations)", check=lambda v: v >= 1,
                         must="at least 1")
    lam: float = option(0.08, "OWL / SV-NUP band half-width λ (sparsities span 2λ)", check=lambda v: 0 < v < 0.5,
                        must="in (0, 0.5); OWL's README uses 0.08")
    absent: str = option("pruned", "SV-NUP state of a non-member block: pruned (D/P) or removed (D/R)",
                         choices=("pruned", "removed"))
    background: str = option("pruned", "SV-NUP blocks outside the window: pruned (default, chosen on C4 held-out "
                             "ppl, BENCHMARKS.md) or dense", choices=("dense", "pruned"))
    payoff: str = option("nll", "SV-NUP payoff: −mean NLL or −perplexity", choices=("nll", "ppl"))
    sv_samples: int = option(32, "SV-NUP evaluation windows (held-out C4)", check=lambda v: v >= 1, must="at least 1")
    sv_seqlen: Optional[int] = option(None, "SV-NUP evaluation window length in tokens (default: the calibration "
                                      "--seqlen; methods_svnup §1.8 uses 512 for small local models)",
                                      check=lambda v: v is None or v >= 2, must="at least 2")
    aggregate: str = option("center", "SV-NUP: a block's φ from the window centred on it, or the mean over windows",
                            choices=("center", "mean"))
    stride: int = option(1, "SV-NUP window stride: 1 or w", check=lambda v: v >= 1, must="1 or the window size")
    mapping: str = option("band", "SV-NUP φ → sparsity: band (λ) or proportional density",
                          choices=("band", "proportional"))
    fp32: bool = option(False, "SV-NUP coalition forwards in full fp32 (default TF32 on CUDA)", flag="--sv-fp32")
    local_weights: str = option("shapley", "SWSV weights inside a window", choices=("shapley", "uniform"), cli=False)
    players: Optional[list] = option(None, "blocks that play the game (default all)", cli=False)


def allocate_svnup(ctx: AllocContext, target: float, options: SVNUPOptions | None = None) -> Allocation:
    o = options or SVNUPOptions()
    window, lam, absent, background, payoff = o.window, o.lam, o.absent, o.background, o.payoff
    sv_samples, aggregate, stride, mapping, local_weights = o.sv_samples, o.aggregate, o.stride, o.mapping, o.local_weights
    ad = ctx.adapter
    L = ad.n_blocks
    players = list(range(L)) if o.players is None else list(o.players)
    if not players:
        raise UserError("SV-NUP needs at least one player block")
    if not (1 <= window <= len(players)):
        raise UserError(f"--window {window} must be between 1 and the number of player blocks ({len(players)})")
    if stride not in (1, window):
        raise UserError(f"--stride must be 1 or the window size ({window})")
    E = swsv_evaluations(len(players), window, stride)
    seqlen = int(o.sv_seqlen or ctx.extra.get("seqlen", 2048))
    eta = estimate_seconds(ad.model, sv_samples * seqlen, E, ctx.extra.get("device", torch.device("cpu")))
    if (eta > 3600 or window > 10) and not ctx.allow_long:
        raise UserError(f"SWSV with window {window} needs {E} evaluations (roughly {eta / 60:.0f} min here); "
                        "pass --yes to run it, or use a smaller --window")
    sv_ids = ctx.extra["sv_ids"](sv_samples, seqlen) if callable(ctx.extra.get("sv_ids")) else ctx.extra.get("sv_ids")
    dev = ctx.extra.get("device", torch.device("cpu"))
    t0 = time.perf_counter()
    weights = ctx.extra.get("weights")
    game = SVGame(ad.model, ad, sv_ids[:sv_samples], ctx.calib(), target, ctx.extra.get("pruner", "sparsegpt"), dev,
                  background, absent, payoff, int(ctx.extra.get("batch_size", 8)), bool(ctx.extra.get("progress", True)),
                  ctx.extra.get("pruner_kwargs"), not o.fp32, weights=weights, scratch=ctx.extra.get("scratch"))
    try:
        t1 = time.perf_counter()
        phi_p, evals = game.swsv(players, window, aggregate, stride, local_weights, bool(ctx.extra.get("progress", True)))
        t_sv = time.perf_counter() - t1
    finally:
        game.close()
        if dev.type == "cuda" and weights is None:
            for b in ad.blocks:
                b.to("cpu")
    log.info("SV-NUP: %d evaluations (E(L=%d, w=%d) = %d) in %.1f s", evals, len(players), window, E, t_sv)
    phi = np.zeros(L)
    phi[players] = phi_p
    s_players = svnup_sparsities(phi_p, target, lam, mapping)
    s = np.full(L, target, dtype=np.float64)
    s[players] = s_players
    diag = {"phi": phi.tolist(), "evaluations": evals, "expected_evaluations": E, "window": window, "lambda": lam,
            "absent": absent, "background": background, "payoff": payoff, "sv_samples": int(sv_ids[:sv_samples].shape[0]),
            "sv_seqlen": int(sv_ids.shape[1]), "aggregate": aggregate, "stride": stride, "mapping": mapping, "local_weights": local_weights,
            "sv_seconds": t_sv, "tf32": not o.fp32, "ranks": world_size(),
            "evaluations_per_rank": getattr(game, "evaluations_per_rank", [evals]), "setup_seconds": t1 - t0, "evals_per_second": evals / max(t_sv, 1e-9),
            "streamed": weights is not None, "block_reads": game.block_reads,
            "unclipped": s.tolist()}
    alloc = finish("svnup", ad, target, per_block=s.tolist(), lo=0.0, hi=0.99, diagnostics=diag)
    if L > 2 and alloc.per_block[0] > target:
        log.warning("SV-NUP: the first block got sparsity %.3f > target %.3f (published allocators give shallow "
                    "blocks less); check the game settings", alloc.per_block[0], target)
    return alloc


SPEC = AllocatorSpec("svnup", SVNUPOptions, fn=allocate_svnup, needs_pruner=True,
                     doc="Shapley-value non-uniform pruning, sliding-window SV (Sun et al. 2025)")
