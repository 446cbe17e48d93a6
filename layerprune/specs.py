"""What a method registers: its function or class, its options dataclass, and its capabilities.

Metadata travels with the registration (as in lm-eval's registry): the CLI flags, the validation, the
cache key and ``layerprune ls`` are all generated from these specs, so adding a method is one file that
defines ``SPEC`` plus one ``register_*`` line in its package's ``__init__``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from layerprune.options import NoOptions, build


@dataclass(frozen=True)
class _Spec:
    name: str
    options: type

    @property
    def kind(self) -> str:
        return "pruner" if isinstance(self, PrunerSpec) else "allocation"

    def make_options(self, values: Any = None) -> Any:
        """The options instance from a dict of values (``None`` or missing keys = defaults) or an
        instance; validated against the declarations, bad values raise one ``UserError``."""
        if isinstance(values, self.options):
            return values
        return build(self.options, values if isinstance(values, dict) else None, f"{self.kind} {self.name}:")


@dataclass(frozen=True)
class PrunerSpec(_Spec):
    """A within-layer pruner: ``cls(layer, options)`` with ``add_batch → (reduce) → prune → free``."""

    cls: type = object
    needs_data: bool = True
    supports_nm: bool = True
    doc: str = ""

    def make(self, layer, options: Any = None):
        return self.cls(layer, self.make_options(options))


@dataclass(frozen=True)
class AllocatorSpec(_Spec):
    """An across-layer allocator: ``fn(ctx, target, options) -> Allocation``.

    ``needs_calibration``: it reads calibration data (so the calibration settings enter its cache key);
    ``needs_pruner``: it runs the base pruner itself (SV-NUP's game; the pruner and its options enter the
    key); ``supports_nm``: it can give each block its own N of an N:M pattern; ``target_range``: the
    targets it accepts; ``cached``: its result is worth caching on disk."""

    fn: Callable[..., Any] = print
    needs_calibration: bool = True
    needs_pruner: bool = False
    supports_nm: bool = False
    target_range: tuple[float, float] = (0.0, 0.99)
    cached: bool = True
    doc: str = ""


__all__ = ["AllocatorSpec", "NoOptions", "PrunerSpec"]
