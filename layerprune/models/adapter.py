"""Find the decoder blocks and their prunable linears in any Hugging Face causal LM.

No per-architecture tables: the block stack is the ``nn.ModuleList`` whose children are
decoder layers (``model.get_decoder().layers`` when it exists, otherwise the longest
``ModuleList`` whose children's class is named in ``_no_split_modules``, otherwise the longest
``ModuleList`` of identical modules that hold linears). Prunable linears are the ``nn.Linear``
modules inside a block; ``lm_head`` and embeddings are never inside a block, so they are never pruned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from layerprune.errors import UserError


def _module_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified_name, module_list)`` of the decoder-block stack."""
    names = {id(m): n for n, m in model.named_modules()}
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            dec = get_decoder()
        except Exception:  # noqa: BLE001 - best effort only, fall through to the generic search
            dec = None
        for attr in ("layers", "h", "blocks"):
            cand = getattr(dec, attr, None) if dec is not None else None
            if isinstance(cand, nn.ModuleList) and len(cand) > 0 and id(cand) in names:
                return names[id(cand)], cand
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    lists = _module_lists(model)
    if no_split:
        hits = [(n, m) for n, m in lists if all(type(c).__name__ in no_split for c in m)]
        if hits:
            return max(hits, key=lambda t: len(t[1]))
    hits = [
        (n, m)
        for n, m in lists
        if len({type(c) for c in m}) == 1 and any(isinstance(x, nn.Linear) for x in m[0].modules())
    ]
    if hits:
        return max(hits, key=lambda t: len(t[1]))
    raise UserError(
        f"cannot find the decoder blocks of {type(model).__name__}: layerprune needs a causal LM whose "
        "decoder layers form an nn.ModuleList (e.g. model.model.layers)"
    )


def find_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` modules of one block, in module order, keyed by their name inside the block."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


@dataclass
class ModelAdapter:
    """The view of a model that the engine and the allocators need: blocks and their linears."""

    model: nn.Module
    blocks_name: str = ""
    blocks: nn.ModuleList = field(default_factory=nn.ModuleList)
    linear_names: list[list[str]] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module) -> "ModelAdapter":
        name, blocks = find_blocks(model)
        lin = [list(find_linears(b).keys()) for b in blocks]
        if not any(lin):
            raise UserError(f"{type(model).__name__} has no nn.Linear inside its decoder blocks: nothing to prune")
        return cls(model=model, blocks_name=name, blocks=blocks, linear_names=lin)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def linears(self, i: int) -> dict[str, nn.Linear]:
        return find_linears(self.blocks[i])

    def full_name(self, i: int, name: str) -> str:
        return f"{self.blocks_name}.{i}.{name}"

    def all_linears(self) -> list[tuple[int, str, nn.Linear]]:
        return [(i, n, m) for i in range(self.n_blocks) for n, m in self.linears(i).items()]

    def linear_sizes(self) -> dict[str, int]:
        """Element count of every prunable weight, keyed by full name."""
        return {self.full_name(i, n): m.weight.numel() for i, n, m in self.all_linears()}

    def block_sizes(self) -> list[int]:
        return [sum(m.weight.numel() for m in self.linears(i).values()) for i in range(self.n_blocks)]

    def block_dtype(self) -> torch.dtype:
        return next(self.blocks[0].parameters()).dtype
