"""Typed method options, declared once (the way peft's ``LoraConfig`` fields carry default and help).

A method's options are a dataclass whose fields are made with :func:`option`: the default, the help
text, the command-line flag (``--field-name`` unless given), the allowed values and the validity
check live in that one declaration. From it come the CLI flags (``layerprune.cli``), the validation
(:func:`validate`, run before any model is loaded) and the cache key (:func:`resolved`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Callable, get_type_hints

from layerprune.errors import UserError


def option(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None,
           check: Callable[[Any], bool] | None = None, must: str = "", cli: bool = True) -> Any:
    """A dataclass field with its help, flag, allowed ``choices`` and ``check`` (``must`` says what a valid
    value is, for the error message). ``cli=False`` keeps a library-only option off the command line."""
    meta = {"help": help, "flag": flag, "choices": choices, "check": check, "must": must, "cli": cli}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def field_type(cls: type, f: dataclasses.Field) -> type:
    """The runtime type of a field (``float``, ``int``, ``str``, ``bool``; ``Optional`` unwrapped)."""
    t = get_type_hints(cls).get(f.name, str)
    args = [a for a in getattr(t, "__args__", ()) if a is not type(None)]
    return args[0] if args and getattr(t, "__origin__", None) is not list else t


def validate(opts: Any, who: str = "") -> Any:
    """Check every field of ``opts`` against its declaration; a bad one raises one :class:`UserError`
    that names the flag, the value and what is allowed."""
    for f in fields(opts):
        v = getattr(opts, f.name)
        flag = flag_of(f)
        ch = f.metadata.get("choices")
        pre = f"{who} " if who else ""
        if ch is not None and v not in ch:
            raise UserError(f"{pre}{flag} must be one of {', '.join(map(str, ch))} (got {v!r})")
        chk = f.metadata.get("check")
        if chk is not None:
            try:
                ok = bool(chk(v))
            except TypeError:
                ok = False
            if not ok:
                raise UserError(f"{pre}{flag} must be {f.metadata.get('must') or 'valid'} (got {v!r})")
    return opts


def build(cls: type, values: dict | None, who: str = "") -> Any:
    """``cls(**values)`` with unknown names refused, ``None`` meaning "the default", and values checked."""
    values = {k: v for k, v in (values or {}).items() if v is not None}
    names = {f.name: f for f in fields(cls)}
    bad = [k for k in values if k not in names]
    if bad:
        known = ", ".join(sorted(names)) or "none"
        raise UserError(f"{who or cls.__name__} has no option {', '.join(bad)} (its options: {known})")
    typed = {}
    for k, v in values.items():
        t = field_type(cls, names[k])
        if t is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if t in (int, float, str, bool) and not isinstance(v, t):
            raise UserError(f"{who} {flag_of(names[k])} must be a {t.__name__} (got {v!r})".strip())
        typed[k] = v
    return validate(cls(**typed), who)


def resolved(opts: Any) -> dict:
    """Every option with its value (defaults included), for cache keys and run records."""
    return dataclasses.asdict(opts)


@dataclass(frozen=True)
class NoOptions:
    """A method without options."""


__all__ = ["NoOptions", "build", "field_type", "flag_of", "option", "resolved", "validate"]
