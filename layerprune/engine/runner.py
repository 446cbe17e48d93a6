"""Capture every block's inputs and keyword arguments, then run blocks one at a time.

Capture: each block's ``forward`` is replaced for one pass by a recorder that stores its hidden
state (block 0) and **all** its keyword arguments (attention mask, ``position_embeddings``, per-layer
masks such as Gemma3's sliding/global ones), returns the hidden state unchanged, and stops the forward
at the last block. That pass costs only the embedding, mask and rotary computation, and it yields the
right kwargs for every block type (the old "Catcher" that keeps only mask and position ids breaks on
transformers 5).

Memory: only the current block lives on the accelerator; activations stay there when they fit
(``offload="auto"``) or are streamed from pinned CPU memory, one batch ahead, on a side stream.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import torch
from torch import nn

from layerprune.models.adapter import ModelAdapter

log = logging.getLogger("layerprune")

_DROP_KWARGS = {"past_key_values", "past_key_value", "use_cache", "cache_position_ids"}


class StopForward(Exception):
    """Raised inside a block's forward to end it early: by the input capture at the last block, and by
    ``feed_hooks(stop=True)`` once every observed linear has had its input."""


def _block_ids(adapter: ModelAdapter) -> set[int]:
    return {id(m) for b in adapter.blocks for m in b.modules()}


def move_non_block(model: nn.Module, adapter: ModelAdapter, device: torch.device) -> None:
    """Move every parameter and buffer *outside* the decoder blocks (embeddings, norms, rotary, head)."""
    inside = _block_ids(adapter)
    seen: set[int] = set()
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for k, p in mod._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                p.data = p.data.to(device)
        for k, b in mod._buffers.items():
            if b is not None:
                mod._buffers[k] = b.to(device)


def _to(obj: Any, device: torch.device) -> Any:
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b if not torch.is_tensor(a) and not torch.is_tensor(b) else False


def _dedupe(kw: dict, prev: dict | None) -> dict:
    """Reuse the previous batch's objects for equal kwargs, so identical masks/rotary are stored once."""
    if prev is None:
        return kw
    return {k: (prev[k] if k in prev and _same(v, prev[k]) else v) for k, v in kw.items()}


class BlockRunner:
    """Holds the calibration activations entering the current block and runs blocks over them.

    ``acts[b]`` is batch ``b`` of hidden states; ``kwargs[b][i]`` are block ``i``'s keyword arguments
    for batch ``b`` (on the execution device; equal ones are shared).
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, device: torch.device,
                 batch_size: int = 8, offload: str = "auto") -> None:
        self.model, self.adapter, self.device = model, adapter, device
        self.batch_size = max(1, int(batch_size))
        self.acts: list[torch.Tensor] = []
        self.kwargs: list[list[dict]] = []
        self.args: list[list[tuple]] = []
        self.on_device = self._decide_offload(offload, input_ids)
        self._capture(input_ids)
        self.block = 0

    # ---------------------------------------------------------------- capture
    @torch.no_grad()
    def _capture(self, input_ids: torch.Tensor) -> None:
        model, adapter, dev = self.model, self.adapter, self.device
        move_non_block(model, adapter, dev)
        L = adapter.n_blocks
        rec: dict[str, Any] = {}

        def recorder(i: int) -> Callable:
            def fwd(hidden_states, *args, **kwargs):
                if i == 0:
                    rec["h"] = hidden_states
                rec.setdefault("kw", {})[i] = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
                rec.setdefault("args", {})[i] = args
                if i == L - 1:
                    raise StopForward
                return hidden_states

            return fwd

        for i, b in enumerate(adapter.blocks):
            b.forward = recorder(i)
        try:
            prev: list[dict] | None = None
            for s in range(0, input_ids.shape[0], self.batch_size):
                rec.clear()
                try:
                    model(input_ids=input_ids[s : s + self.batch_size].to(dev), use_cache=False)
                except StopForward:
                    pass
                if "h" not in rec or len(rec.get("kw", {})) != L:
                    raise RuntimeError("input capture failed: the model did not call every decoder block")
                kws = [_dedupe(rec["kw"][i], prev[i] if prev else None) for i in range(L)]
                for i in range(1, L):  # blocks of one type usually share kwargs: store once
                    kws[i] = _dedupe(kws[i], kws[i - 1])
                prev = kws
                self.kwargs.append(kws)
                self.args.append([rec["args"][i] for i in range(L)])
                h = rec["h"].detach()
                if not self.on_device:  # stream to pinned CPU memory batch by batch
                    h = h.to("cpu").pin_memory()
                self.acts.append(h)
        finally:
            for b in adapter.blocks:
                if "forward" in b.__dict__:
                    del b.forward

    def _decide_offload(self, offload: str, input_ids: torch.Tensor) -> bool:
        if self.device.type != "cuda":
            return True
        if offload in ("device", "gpu"):
            return True
        if offload == "cpu":
            return False
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        el = torch.tensor([], dtype=self.adapter.block_dtype()).element_size()
        need = input_ids.numel() * int(getattr(cfg, "hidden_size")) * el
        free, _ = torch.cuda.mem_get_info(self.device)
        block = sum(p.numel() * p.element_size() for p in self.adapter.blocks[0].parameters())
        keep = need + 6 * block < 0.6 * free
        log.info("calibration activations: %.1f MiB, kept on %s", need / 2**20, "GPU" if keep else "CPU (streamed)")
        return keep

    # ---------------------------------------------------------------- running
    def _batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        if self.on_device or self.device.type != "cuda":
            yield from enumerate(a.to(self.device) for a in self.acts)
            return
        stream = torch.cuda.Stream(self.device)
        cur = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream):
            nxt = self.acts[0].to(self.device, non_blocking=True)
        for b in range(len(self.acts)):
            cur.wait_stream(stream)
            x = nxt
            x.record_stream(cur)
            if b + 1 < len(self.acts):
                with torch.cuda.stream(stream):
                    nxt = self.acts[b + 1].to(self.device, non_blocking=True)
            yield b, x

    @torch.no_grad()
    def run(self, i: int, store: bool, block: nn.Module | None = None) -> None:
        """Run block ``i`` over every batch; with ``store`` its outputs replace the activations."""
        block = self.adapter.blocks[i] if block is None else block
        for b, x in self._batches():
            try:
                out = block(x, *self.args[b][i], **self.kwargs[b][i])
            except StopForward:  # feed_hooks(stop=True): the statistics are in, the output is not needed
                if store:
                    raise RuntimeError("a block forward whose output is stored was stopped early") from None
                continue
            if isinstance(out, (tuple, list)):
                out = out[0]
            if store:
                if self.on_device:
                    self.acts[b] = out
                else:
                    self.acts[b].copy_(out, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if store:
            self.block = i + 1

    def hidden(self) -> list[torch.Tensor]:
        """The activations entering the current block, one tensor per batch (a new list, same tensors)."""
        return list(self.acts)

    @torch.no_grad()
    def forward(self, b: int, x: torch.Tensor, start: int, stop: int | None = None,
                skip: frozenset[int] | set[int] = frozenset()) -> torch.Tensor:
        """Batch ``b``'s hidden state ``x`` through blocks ``start .. stop-1`` (those in ``skip`` left out),
        with the keyword arguments captured for that batch. The blocks must already be on the device."""
        stop = self.adapter.n_blocks if stop is None else stop
        for i in range(start, stop):
            if i in skip:
                continue
            out = self.adapter.blocks[i](x, *self.args[b][i], **self.kwargs[b][i])
            x = out[0] if isinstance(out, (tuple, list)) else out
        return x

    @torch.no_grad()
    def head_nll(self, b: int, hidden: torch.Tensor, ids: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, int]:
        """Summed next-token NLL of batch ``b`` when the last block outputs ``hidden``: the model's own head
        (final norm, ``lm_head``, logit soft-capping) runs on it with every block an identity.

        The head is per token, so it runs on pieces of at most ``max_tokens`` positions (the fp32 logits
        of a whole batch of Gemma3's 262k vocabulary would take 16 GiB). The sum stays on the device."""
        blocks = self.adapter.blocks
        n, T = ids.shape
        rows = max(1, max_tokens // T)  # whole rows per call when they fit, else pieces of one row
        step = T - 1 if rows > 1 else max(1, min(T - 1, max_tokens))
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

    def place(self, device: torch.device | None = None) -> None:
        """Put every block and the parts outside the blocks on ``device`` (default: the run's device)."""
        dev = self.device if device is None else device
        for blk in self.adapter.blocks:
            blk.to(dev)
        move_non_block(self.model, self.adapter, dev)

    def tokens(self) -> int:
        return sum(a.shape[0] * a.shape[1] for a in self.acts)

    def free(self) -> None:
        self.acts, self.kwargs, self.args = [], [], []
