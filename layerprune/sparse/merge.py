"""Linears that read the same input run as one: q/k/v after the attention norm, gate/up after the MLP norm.

A decode step is a string of small, memory-bound matrix-vector products, and a small one is bound by latency
more than by bytes: on the H200 at 70% one 4096×4096 sparse linear runs at 1.6× dense while an 11008×4096
one runs at 1.9× (BENCHMARKS.md, session 14). Stacking the rows of the linears that share an input makes one
launch of a taller weight in place of two or three short ones. Nothing is recomputed and no arithmetic
changes: each output row is the same dot product as before (the one-token kernels' launch settings depend on
the input width and the token count, not on the rows, so their row sums keep their order; the tensor-core and
cuBLAS paths may pick another split of the columns for the taller shape).

Which linears share an input is found by a trace, not by names: one two-token forward with pre-hooks notes the
very tensor each block linear receives (the engine's :func:`layerprune.engine.sequential.feed_hooks`, which also
finds the linears whose SparseGPT Hessians are shared). A group is merged when its members are of one kind (all
:class:`SparseLinear` in one layout, or all ``nn.Linear``), of one dtype, with the same input width, and all with
or without a bias.

At run time the first member of a group computes the stacked product and keeps it; the others return their
slice of it when they receive the same tensor (identity), and the last one drops it. A member called with
another tensor computes the product itself, so any call order is correct.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from layerprune.sparse import delta
from layerprune.sparse.linear import SparseLinear, pack_as

log = logging.getLogger("layerprune")


class MergedLinear(nn.Module):
    """One linear holding the stacked rows of several; ``part(i, x)`` gives member ``i``'s output."""

    def __init__(self, linear: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.linear = linear
        self.sizes = list(sizes)
        self.bounds = [sum(self.sizes[:i]) for i in range(len(self.sizes) + 1)]
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None

    def part(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i == 0 or self._x is not x:
            self._x, self._y = x, self.linear(x)
        y = self._y[..., self.bounds[i]:self.bounds[i + 1]]
        if i == len(self.sizes) - 1:
            self._x = self._y = None
        return y


class MergedPart(nn.Module):
    """Stands where member ``index`` of a :class:`MergedLinear` was (same ``in_features``/``out_features``)."""

    def __init__(self, group: MergedLinear, index: int) -> None:
        super().__init__()
        self.group = group
        self.index = index
        self.in_features = group.linear.in_features
        self.out_features = group.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.part(self.index, x)

    def extra_repr(self) -> str:
        return f"part {self.index} of {len(self.group.sizes)}, out_features={self.out_features}"


def cat_delta(parts: list[delta.DeltaTensor]) -> delta.DeltaTensor:
    """The ``delta`` weight of the rows of ``parts`` stacked (exact: groups are per row, so the buffers are
    concatenated and the row pointers shifted)."""
    k = parts[0].shape[1]
    if any(p.shape[1] != k for p in parts):
        raise ValueError("cat_delta: the weights have different input widths")
    gptr, base = [parts[0].gptr[:1]], 0
    for p in parts:
        gptr.append(p.gptr[1:] + base)
        base += p.groups
    return delta.DeltaTensor(torch.cat([p.values for p in parts]), torch.cat([p.deltas for p in parts]),
                             torch.cat([p.starts for p in parts]), torch.cat(gptr),
                             (sum(p.shape[0] for p in parts), k))


def _stack(mods: list[nn.Module]) -> nn.Module | None:
    """One module computing the members' outputs side by side, or None when they cannot be stacked."""
    first = mods[0]
    kinds = {type(m) for m in mods}
    if len(kinds) != 1 or kinds.pop() not in (SparseLinear, nn.Linear):
        return None
    if len({m.in_features for m in mods}) != 1 or len({m.bias is None for m in mods}) != 1:
        return None
    bias = None if first.bias is None else torch.cat([m.bias.data for m in mods])
    if isinstance(first, nn.Linear):
        w = [m.weight for m in mods]
        if len({(t.dtype, t.device) for t in w}) != 1:
            return None
        out = nn.Linear(first.in_features, sum(m.out_features for m in mods), bias=bias is not None,
                        device=w[0].device, dtype=w[0].dtype)
        out.weight.data = torch.cat([t.data for t in w])
    else:
        if len({m.layout for m in mods}) != 1 or len({(m.values.dtype, m.values.device) for m in mods}) != 1:
            return None
        sp = (cat_delta([m.packed() for m in mods]) if first.layout == "delta"
              else pack_as(torch.cat([m.dense_weight() for m in mods]), first.layout))
        out = SparseLinear(first.in_features, sp.shape[0], bias is not None, sp, first.values.dtype,
                           first.values.device)
    if bias is not None:
        out.bias.data = bias
    return out


@torch.no_grad()
def sibling_groups(model: nn.Module) -> list[list[str]]:
    """Names of the block linears that receive the very same input tensor, in call order (groups of ≥ 2),
    from one two-token forward through the engine's :func:`~layerprune.engine.sequential.feed_hooks` (which finds
    the inputs SparseGPT's Hessians share the same way)."""
    from types import SimpleNamespace

    from layerprune.engine.sequential import feed_hooks
    from layerprune.models.adapter import find_blocks

    bname, blocks = find_blocks(model)
    linears = {f"{bname}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in b.named_modules()
               if isinstance(m, (nn.Linear, SparseLinear))}
    nothing = SimpleNamespace(add_batch=lambda x: None)
    members: dict[str, str] = {}  # member → leader, in call order
    with feed_hooks(linears, dict.fromkeys(linears, nothing), members):
        model(input_ids=torch.tensor([[1, 2]], device=next(model.parameters()).device), use_cache=False)
    groups: dict[str, list[str]] = {}
    for member, leader in members.items():
        groups.setdefault(leader, [leader]).append(member)
    return list(groups.values())


def merge_siblings(model: nn.Module) -> list[list[str]]:
    """Merge, in place, every group of :func:`sibling_groups` that can be stacked (module docstring); returns
    the groups merged. A group that mixes packed and dense linears (a layer under its break-even) is left as it is."""
    from layerprune.sparse.export import _set_module

    merged = []
    for names in sibling_groups(model):
        mods = [model.get_submodule(n) for n in names]
        stacked = _stack(mods)
        if stacked is None:
            log.debug("not merged (different kinds, layouts, widths or biases): %s", ", ".join(names))
            continue
        group = MergedLinear(stacked, [m.out_features for m in mods])
        for i, n in enumerate(names):
            _set_module(model, n, MergedPart(group, i))
        merged.append(names)
    return merged

