"""Fused RMSNorm and rotary-embedding kernels for the forwards layerprune runs on the GPU.

Why: a profile of one LLaMA-2-7B block over 8 × 2048 tokens on an H200 (``python3 bench/probe_forward.py
--parts kernels``) spends 8.5 of its 13.5 ms in the matmuls and 0.5 ms in attention, but about 1.8 ms in
RMSNorm's seven PyTorch kernels (two norms) and 2.0 ms in the rotary embedding, whose products run on strided
query/key views with PyTorch's slow non-vectorised path, plus a ``cat`` and a negation. Every calibration,
statistics and evaluation sweep pays that. The kernels in :mod:`layerprune.engine.fused_triton` do each in
one pass over the tensor.

What is replaced, and only inside :func:`fused_ops`:

- the ``forward`` of every norm module whose class's ``forward`` is LLaMA's ``LlamaRMSNorm.forward``
  (same code: compared as syntax trees, so Mistral's, Qwen2's and Qwen3's copies match; Gemma's
  ``(1 + weight)`` form does not), as an instance attribute;
- the module-level ``apply_rotary_pos_emb`` of every modeling module whose function is LLaMA's (same test),
  which the attention modules look up at call time.

Each replacement is checked against the code it replaces on its first call, on that call's own inputs:
the rotary result must be bit-identical, the norm's within one unit in the last place of the model's dtype
(only the order of the fp32 sum of squares differs). A replacement that fails the check (a future
transformers changing the formula) is dropped for the rest of the process with a warning, and the original
code runs. Inputs the kernels do not cover (CPU tensors without the interpreter, gradients, fp32 rotary
inputs, other shapes) go to the original code on every call. On leaving the context everything is restored.

transformers' own route to such kernels (``use_kernels=True``, the ``kernels`` package) downloads them from
the Hub; layerprune must run offline, so it carries these two small kernels instead.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import logging
import os
import sys
import textwrap
from typing import Any, Callable, Iterator

import torch
from torch import nn

from layerprune.triton_support import usable

log = logging.getLogger(__name__)

ENABLED = os.environ.get("LAYERPRUNE_FUSED_KERNELS", "1") != "0"  # the CLI's --no-fused-kernels sets it False
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
# not fp32: the compiler may contract its q·cos + r·sin into an FMA, which PyTorch's three kernels do not
_ROPE_FLOATS = (torch.bfloat16, torch.float16)
_TRUST: dict[Any, bool | None] = {}  # replacement key → passed its first-call check (None: not yet checked)
_TREES: dict[Any, str | None] = {}


def _tree(fn: Callable) -> str | None:
    """The function's syntax tree (arguments and body, docstring left out), for comparing two copies."""
    if fn not in _TREES:
        try:
            node = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
        except (OSError, TypeError, SyntaxError, IndexError):
            _TREES[fn] = None
            return None
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
            body = body[1:]
        _TREES[fn] = ast.dump(node.args) + ast.dump(ast.Module(body=body, type_ignores=[]))
    return _TREES[fn]


def _references() -> tuple[str | None, str | None]:
    from transformers.models.llama import modeling_llama as ml

    return _tree(ml.LlamaRMSNorm.forward), _tree(ml.apply_rotary_pos_emb)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within one unit in the last place of ``b``'s dtype (eight for fp32, whose sums' rounding order
    shows in the last bits)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ulp = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -20}[b.dtype]
    a32, b32 = a.float(), b.float()
    return bool(((a32 - b32).abs() <= b32.abs() * ulp + 1e-30).all())


def _checked(key: Any, name: str, fused: Callable[[], Any], orig: Callable[[], Any],
             same: Callable[[Any, Any], bool]) -> Any:
    """Run the fused version; on the first call of ``key`` also the original, and keep trusting the fused
    one only if ``same`` holds."""
    state = _TRUST.get(key)
    if state:
        return fused()
    if state is False:
        return orig()
    want, got = orig(), fused()
    _TRUST[key] = ok = same(got, want)
    if not ok:
        log.warning("layerprune: the fused %s differs from the model's own code here; using the model's code", name)
    return got if ok else want


def _norm_ok(m: nn.Module, x: torch.Tensor) -> bool:
    w = getattr(m, "weight", None)
    return (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and usable(x.device)
            and x.dtype in _FLOATS and w.dtype == x.dtype and w.device == x.device and w.dim() == 1
            and x.dim() >= 1 and x.shape[-1] == w.shape[0] and x.stride(-1) == 1
            and isinstance(getattr(m, "variance_epsilon", None), float)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def _norm_forward(m: nn.Module) -> Callable:
    orig = type(m).forward.__get__(m)

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        if not _norm_ok(m, hidden_states):
            return orig(hidden_states)
        from layerprune.engine.fused_triton import rms_norm

        return _checked(("norm", type(m), hidden_states.dtype), "RMSNorm",
                        lambda: rms_norm(hidden_states, m.weight, m.variance_epsilon),
                        lambda: orig(hidden_states), _close)

    return forward


def _rope_ok(q: Any, k: Any, cos: Any, sin: Any) -> bool:
    if not all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin)):
        return False
    return (usable(q.device) and q.dtype in _ROPE_FLOATS and all(t.dtype == q.dtype and t.device == q.device
                                                                  for t in (k, cos, sin))
            and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and sin.shape == cos.shape
            and sin.stride() == cos.stride() and q.shape[-1] % 2 == 0 and k.shape[-1] == q.shape[-1]
            and cos.shape[-1] == q.shape[-1] and cos.shape[1] == q.shape[2] == k.shape[2]
            and q.shape[0] == k.shape[0] and cos.shape[0] in (1, q.shape[0])
            and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, cos, sin))))


def _rope_function(orig: Callable) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze = kwargs.get("unsqueeze_dim", args[0] if args else 1)
        if unsqueeze != 1 or len(args) > 1 or set(kwargs) - {"unsqueeze_dim"} or not _rope_ok(q, k, cos, sin):
            return orig(q, k, cos, sin, *args, **kwargs)
        from layerprune.engine.fused_triton import rope

        return _checked(("rope", orig, q.dtype), "rotary embedding",
                        lambda: (rope(q, cos, sin), rope(k, cos, sin)), lambda: orig(q, k, cos, sin, *args, **kwargs),
                        lambda a, b: all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b)))

    apply_rotary_pos_emb.__wrapped__ = orig  # type: ignore[attr-defined]
    apply_rotary_pos_emb.layerprune_fused = True  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


@contextlib.contextmanager
def fused_ops(model: nn.Module, device: torch.device | str, enabled: bool | None = None) -> Iterator[dict]:
    """Inside the context, ``model``'s LLaMA-form RMSNorms and rotary embeddings run the fused kernels on
    ``device`` (see the module docstring). Yields what was replaced: ``{"norms": n, "rotary": [module, ...]}``
    (empty when disabled, or when Triton cannot run on ``device``). ``enabled=None`` follows :data:`ENABLED`
    (environment ``LAYERPRUNE_FUSED_KERNELS=0`` or the CLI's ``--no-fused-kernels`` turn it off)."""
    done: dict[str, Any] = {}
    if not (ENABLED if enabled is None else enabled) or not usable(torch.device(device)):
        yield done
        return
    try:
        norm_ref, rope_ref = _references()
    except ImportError:
        yield done
        return
    norms = [m for m in model.modules() if "forward" not in m.__dict__ and norm_ref is not None
             and isinstance(getattr(m, "variance_epsilon", None), float) and _tree(type(m).forward) == norm_ref]
    modules = {type(m).__module__ for m in model.modules()}
    ropes = []
    for name in sorted(modules):
        mod = sys.modules.get(name)
        fn = getattr(mod, "apply_rotary_pos_emb", None)
        if (callable(fn) and not getattr(fn, "layerprune_fused", False) and rope_ref is not None
                and _tree(fn) == rope_ref):
            ropes.append((mod, fn))
    try:
        for m in norms:
            m.forward = _norm_forward(m)
        for mod, fn in ropes:
            mod.apply_rotary_pos_emb = _rope_function(fn)
        done.update(norms=len(norms), rotary=[mod.__name__ for mod, _ in ropes])
        yield done
    finally:
        for m in norms:
            m.__dict__.pop("forward", None)
        for mod, fn in ropes:
            mod.apply_rotary_pos_emb = fn


def warm_up(config: dict, dtype: torch.dtype, device: torch.device) -> None:
    """Compile the fused kernels for a model with this ``config.json`` (hidden size, heads, head size) and
    ``dtype``, into Triton's on-disk cache. The calls use the argument kinds of the real ones (the same
    constexprs; sizes and strides multiples of 16 where the model's are), so the real calls find the binaries;
    a model whose code the kernels do not replace only spends the compile. See :func:`warm_up_process`."""
    if not ENABLED or dtype not in _FLOATS or not usable(torch.device(device)):
        return
    from layerprune.engine.fused_triton import rms_norm, rope

    h, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    d = int(config.get("head_dim") or h // heads)
    n = 16
    x = torch.zeros(n, h, dtype=dtype, device=device)
    rms_norm(x, torch.ones(h, dtype=dtype, device=device), float(config.get("rms_norm_eps") or 1e-6))
    if dtype in _ROPE_FLOATS and d % 2 == 0:
        cos = torch.zeros(1, n, d, dtype=dtype, device=device)
        for nh in {heads, int(config.get("num_key_value_heads") or heads)}:
            rope(torch.zeros(1, n, nh, d, dtype=dtype, device=device).transpose(1, 2), cos, cos)
    torch.cuda.synchronize(device)


_WARM_CODE = ("import json, sys, torch; from layerprune.engine.fused import warm_up; "
              "warm_up(json.load(open(sys.argv[1])), getattr(torch, sys.argv[2]), torch.device(sys.argv[3]))")


def warm_up_process(config_path: str, dtype: torch.dtype, device: torch.device):
    """Start a Python process that runs :func:`warm_up` (returned as a ``subprocess.Popen``; None when it is
    not needed or cannot start). On a machine whose Triton cache is empty the kernels' JIT compilation
    otherwise lands in the first block a run executes: 2.4–2.6 s of a LLaMA-2-7B run's first block on the
    H200, against 1.1–1.3 s once the cache holds them. A process of its own, because compiling is mostly
    Python holding the interpreter lock: on a thread it slowed the imports it ran beside. Whatever it has
    not cached when the first block runs, that block compiles itself, as before."""
    import subprocess
    from pathlib import Path

    if not ENABLED or dtype not in _FLOATS or not usable(torch.device(device)):
        return None
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x)}
    try:
        return subprocess.Popen([sys.executable, "-c", _WARM_CODE, config_path, str(dtype).split(".")[-1], str(device)],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    except OSError:
        return None
