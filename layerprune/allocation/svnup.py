"""SV-NUP — Shapley-value non-uniform pruning (Sun, Yu, Cui, Li 2025, arXiv 2505.01731v3).

Reconstructed as in methods_svnup.md (no code or paper body is public); every open choice is a
switch. The game (§1.3): players are the decoder blocks; a member block is dense (D), a non-member
is pruned to the target by the base pruner (P, ``absent="pruned"``) or skipped (R, ``"removed"``);
blocks outside the window are dense or pruned (``background``); the payoff is −mean token NLL
(``payoff="nll"``) or −perplexity (``"ppl"``) on ``sv_samples`` C4 windows disjoint from the
pruning calibration set. SWSV (§1.5) evaluates (L − w + 1)(2^w − 1) + 1 coalitions for stride-1
windows. Cost tricks: each block's pruned copy is computed once and a coalition only swaps weight
tensors; the hidden state entering each window is cached so only blocks from the window on run.
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
import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from layerprune.allocation.common import AllocContext, Allocation, band_from_importance, finish
from layerprune.allocation.shapley import exact_shapley, monte_carlo_shapley, swsv, swsv_evaluations
from layerprune.engine.runner import BlockRunner, move_non_block
from layerprune.engine.sequential import dense_sweep, prune_sequential
from layerprune.errors import UserError
from layerprune.pruners import Pattern, get_pruner

log = logging.getLogger("layerprune")

STATES = ("D", "P", "R")


class SVGame:
    """The block game on one model: weight copies, cached SV-set inputs, and the payoff."""

    def __init__(self, model: nn.Module, adapter, sv_ids: torch.Tensor, calib_ids: torch.Tensor | None,
                 target: float, pruner: str, device: torch.device, background: str = "pruned",
                 absent: str = "pruned", payoff: str = "nll", batch_size: int = 8, progress: bool = True,
                 pruner_kwargs: dict | None = None, tf32: bool = True, head_tokens: int | None = None) -> None:
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
        self.tf32 = tf32 and device.type == "cuda"
        self.evaluations = 0
        L = adapter.n_blocks
        self.dense: list[dict[str, torch.Tensor]] = []
        self.pruned: list[dict[str, torch.Tensor]] = []
        if absent == "pruned" or background == "pruned":
            self._make_pruned_copies(calib_ids, target, pruner, batch_size, progress, pruner_kwargs or {})
        else:
            self.dense = [{n: lin.weight.data for n, lin in adapter.linears(i).items()} for i in range(L)]
        for b in adapter.blocks:
            b.to(device)
        move_non_block(model, adapter, device)
        self.dense = [{n: t.to(device) for n, t in d.items()} for d in self.dense]
        self.pruned = [{n: t.to(device) for n, t in d.items()} for d in self.pruned]
        self.state = ["D"] * L
        self._apply(["D"] * L, force=True)
        self.runner = BlockRunner(model, adapter, sv_ids, device, batch_size, offload="device")
        self.bg_state = "D" if background == "dense" else "P"
        self.absent_state = "P" if absent == "pruned" else "R"

    # -------------------------------------------------------------- weight copies
    @torch.no_grad()
    def _make_pruned_copies(self, calib_ids, target, pruner, batch_size, progress, pk) -> None:
        ad, dev = self.adapter, self.device
        if calib_ids is None and get_pruner(pruner).needs_data:
            raise UserError(f"the {pruner} pruner needs calibration data for the SV game")
        self.dense = [{n: lin.weight.data.clone() for n, lin in ad.linears(i).items()} for i in range(ad.n_blocks)]
        if self.background == "pruned":
            # P copies from the standard sequential uniform-p pass (inputs from pruned blocks)
            plan = {ad.full_name(i, n): Pattern(target) for i in range(ad.n_blocks) for n in ad.linear_names[i]}
            prune_sequential(self.model, ad, calib_ids, plan, pruner, dev, batch_size, progress=progress, pruner_kwargs=pk)
            self.pruned = [{n: lin.weight.data.clone() for n, lin in ad.linears(i).items()} for i in range(ad.n_blocks)]
        else:
            # P copies from dense-model inputs: the engine's dense sweep feeds each pruner, then
            # every linear is pruned, copied, and given its dense weights back
            cls = get_pruner(pruner)

            def copy_pruned(i: int, lins: dict, prs: dict) -> None:
                copies = {}
                for n, lin in lins.items():
                    prs[n].prune(Pattern(target))
                    prs[n].free()
                    copies[n] = lin.weight.data.clone()
                    lin.weight.data = self.dense[i][n].clone()
                self.pruned.append(copies)

            dense_sweep(self.model, ad, calib_ids if cls.needs_data else None, dev,
                        lambda i, lins: {n: cls(lin, **pk) for n, lin in lins.items()}, copy_pruned, batch_size,
                        progress=progress, desc="SV: pruned copies")
        for i in range(ad.n_blocks):  # restore the dense weights bit-exactly
            for n, lin in ad.linears(i).items():
                lin.weight.data = self.dense[i][n]

    def _apply(self, states: list[str], force: bool = False) -> None:
        for i, st in enumerate(states):
            if st == self.state[i] and not force:
                continue
            if st in ("D", "P"):
                src = self.dense[i] if st == "D" else self.pruned[i]
                for n, lin in self.adapter.linears(i).items():
                    lin.weight.data = src[n]
            self.state[i] = st

    # -------------------------------------------------------------- payoff
    @torch.no_grad()
    def _head_nll(self, b: int, hidden: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Run the model's own head (final norm, lm_head, softcapping) on ``hidden``: every block is
        an identity except the last, which returns ``hidden``.

        The head is per token, so it runs on pieces of at most ``head_tokens`` positions: the fp32 logits
        of a whole batch would be batch × seqlen × vocab × 4 bytes (16 GiB for 8 × 2048 tokens of
        Gemma3's 262k vocabulary, several times over with the slice and the softmax). The sum stays on
        the device: one host sync per evaluation, not per piece."""
        blocks = self.adapter.blocks
        ids = self.sv_ids[b * self.runner.batch_size : (b + 1) * self.runner.batch_size]
        n, T = ids.shape
        rows = max(1, self.head_tokens // T)  # whole rows per call when they fit, else pieces of one row
        step = T - 1 if rows > 1 else max(1, min(T - 1, self.head_tokens))
        tot = torch.zeros((), dtype=torch.float64, device=self.device)
        piece: list[torch.Tensor] = []  # what the last block hands to the head on this call
        for blk in blocks[:-1]:
            blk.forward = lambda x, *a, **k: x
        blocks[-1].forward = lambda x, *a, **k: piece[0]
        try:
            for r0 in range(0, n, rows):
                for s in range(0, T - 1, step):
                    e = min(s + step, T - 1)
                    piece[:] = [hidden[r0 : r0 + rows, s:e]]
                    logits = self.model(input_ids=ids[r0 : r0 + rows, s:e], use_cache=False).logits.float()
                    tgt = ids[r0 : r0 + rows, s + 1 : e + 1]
                    tot += nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                                       reduction="sum")
                    del logits
            return tot, n * (T - 1)
        finally:
            for blk in blocks:
                blk.__dict__.pop("forward", None)

    @torch.no_grad()
    def run_from(self, start: int, hidden: list[torch.Tensor], states: list[str]) -> float:
        """Payoff of the model in ``states``, running blocks ``start..L-1`` from cached ``hidden``.

        On CUDA the coalition forwards use TF32 matmuls by default (``tf32``; ~3x faster in fp32,
        payoff error ~1e-4 nats, far below the differences between coalitions)."""
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.tf32 or prev
        try:
            return self._run_from(start, hidden, states)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev

    def _run_from(self, start: int, hidden: list[torch.Tensor], states: list[str]) -> float:
        self._apply(states)
        tot, cnt = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for b, h in enumerate(hidden):
            x = h
            for i in range(start, self.adapter.n_blocks):
                if states[i] == "R":
                    continue
                out = self.adapter.blocks[i](x, *self.runner.args[b][i], **self.runner.kwargs[b][i])
                x = out[0] if isinstance(out, (tuple, list)) else out
            s, c = self._head_nll(b, x)
            tot, cnt = tot + s, cnt + c
        self.evaluations += 1
        nll = float(tot) / cnt
        return -nll if self.payoff_kind == "nll" else -math.exp(nll)

    @torch.no_grad()
    def advance(self, hidden: list[torch.Tensor], i: int) -> list[torch.Tensor]:
        """Hidden states after block ``i`` in its background state (the prefix cache)."""
        st = list(self.state)
        st[i] = self.bg_state
        self._apply(st)
        outs = []
        for b, h in enumerate(hidden):
            out = self.adapter.blocks[i](h, *self.runner.args[b][i], **self.runner.kwargs[b][i])
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return outs

    def states_for(self, players: list[int], members: frozenset, active: list[int]) -> list[str]:
        """Background everywhere; ``active`` players present if in ``members``, else absent."""
        st = [self.bg_state] * self.adapter.n_blocks
        for p in active:
            st[players[p]] = "D" if p in members else self.absent_state
        return st

    # -------------------------------------------------------------- estimators
    def swsv(self, players: list[int], window: int, aggregate: str = "center", stride: int = 1,
             weights: str = "shapley", progress: bool = True) -> tuple[np.ndarray, int]:
        n = len(players)
        hidden = list(self.runner.acts)
        cursor = 0  # hidden = input of block `cursor`
        shared = frozenset(range(window)) if self.bg_state == "D" else (
            frozenset() if self.absent_state == self.bg_state else None)
        total = swsv_evaluations(n, window, stride, shared is not None)
        bar = tqdm(total=total, desc=f"SV-NUP SWSV (w={window})", disable=not progress, unit="eval")
        state = {"cursor": cursor, "hidden": hidden}

        def v_window(st: int, members: frozenset) -> float:
            first = players[st]
            while state["cursor"] < first:
                state["hidden"] = self.advance(state["hidden"], state["cursor"])
                state["cursor"] += 1
            active = list(range(st, st + window))
            val = self.run_from(first, state["hidden"], self.states_for(players, members, active))
            bar.update(1)
            return val

        phi, evals, _ = swsv(n, window, v_window, aggregate, stride, shared, weights)
        bar.close()
        if evals != total:
            raise RuntimeError(f"SWSV made {evals} evaluations, expected E(L, w) = {total}")
        return phi, evals

    def reference(self, players: list[int], method: str = "exact", permutations: int = 100, seed: int = 0,
                  progress: bool = True) -> tuple[np.ndarray, int]:
        """Exact (2^n) or permutation Monte-Carlo Shapley over ``players``; the rest at background."""
        hidden = list(self.runner.acts)
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
        self._apply(["D"] * self.adapter.n_blocks, force=True)

    def close(self) -> None:
        self.restore_dense()
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
    params = sum(p.numel() for p in model.parameters())
    # effective FLOP/s: ~3.8e13 measured on an H100 (smollm2, 32×2048 SV tokens, TF32); the CPU figure is a guess
    rate = 3e13 if device.type == "cuda" else 5e10
    return evaluations * 2 * params * tokens / rate


def allocate_svnup(ctx: AllocContext, target: float, window: int = 4, lam: float = 0.08, absent: str = "pruned",
                   background: str = "pruned", payoff: str = "nll", sv_samples: int = 32, aggregate: str = "center",
                   stride: int = 1, mapping: str = "band", local_weights: str = "shapley", yes: bool = False,
                   players: list[int] | None = None, tf32: bool = True, **_: object) -> Allocation:
    ad = ctx.adapter
    L = ad.n_blocks
    players = list(range(L)) if players is None else list(players)
    if not players:
        raise UserError("SV-NUP needs at least one player block")
    if not (1 <= window <= len(players)):
        raise UserError(f"--window {window} must be between 1 and the number of player blocks ({len(players)})")
    if stride not in (1, window):
        raise UserError(f"--stride must be 1 or the window size ({window})")
    if aggregate not in ("center", "mean"):
        raise UserError("--aggregate must be center or mean")
    if not (0 < lam < 0.5):
        raise UserError(f"SV-NUP lambda must be in (0, 0.5) (got {lam})")
    if not (0.0 <= target <= 0.99):
        raise UserError(f"SV-NUP needs a target sparsity in [0, 0.99] (got {target})")
    E = swsv_evaluations(len(players), window, stride)
    seqlen = int(ctx.extra.get("seqlen", 2048))
    eta = estimate_seconds(ad.model, sv_samples * seqlen, E, ctx.extra.get("device", torch.device("cpu")))
    if (eta > 3600 or window > 10) and not yes:
        raise UserError(f"SWSV with window {window} needs {E} evaluations (roughly {eta / 60:.0f} min here); "
                        "pass --yes to run it, or use a smaller --window")
    sv_ids = ctx.extra["sv_ids"]() if callable(ctx.extra.get("sv_ids")) else ctx.extra.get("sv_ids")
    dev = ctx.extra.get("device", torch.device("cpu"))
    t0 = time.perf_counter()
    game = SVGame(ad.model, ad, sv_ids[:sv_samples], ctx.calib(), target, ctx.extra.get("pruner", "sparsegpt"), dev,
                  background, absent, payoff, int(ctx.extra.get("batch_size", 8)), bool(ctx.extra.get("progress", True)),
                  ctx.extra.get("pruner_kwargs"), tf32)
    try:
        t1 = time.perf_counter()
        phi_p, evals = game.swsv(players, window, aggregate, stride, local_weights, bool(ctx.extra.get("progress", True)))
        t_sv = time.perf_counter() - t1
    finally:
        game.close()
        if dev.type == "cuda":
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
            "aggregate": aggregate, "stride": stride, "mapping": mapping, "local_weights": local_weights,
            "sv_seconds": t_sv, "tf32": tf32, "setup_seconds": t1 - t0, "evals_per_second": evals / max(t_sv, 1e-9),
            "unclipped": s.tolist()}
    alloc = finish("svnup", ad, target, per_block=s.tolist(), lo=0.0, hi=0.99, diagnostics=diag)
    if L > 2 and alloc.per_block[0] > target:
        log.warning("SV-NUP: the first block got sparsity %.3f > target %.3f (published allocators give shallow "
                    "blocks less); check the game settings", alloc.per_block[0], target)
    return alloc
