"""``layerprune bench-decode``: end-to-end greedy decode tokens/s, dense vs sparse, side by side in one run.

Both models decode with a static KV cache (``transformers.StaticCache``) and, by default, one decode
step captured as a CUDA graph and replayed, so Python and launch overhead do not hide the kernels
(``--no-graphs``: eager steps). With ``--compile`` the step is first compiled by ``torch.compile``
(``fullgraph``, static shapes): Inductor fuses the model's norms, rotary embedding and residual adds, which take
≈ 2 ms of a 7B step in eager kernels (BENCHMARKS.md, session 14), while the sparse op stays one opaque op. The
dense model is the dense-with-zeros twin of the sparse one.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from layerprune.errors import UserError

log = logging.getLogger("layerprune")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the decoder linears' weights (dense ``weight`` or packed buffers)."""
    from layerprune.sparse.linear import SparseLinear

    tot = 0
    for m in model.modules():
        if isinstance(m, SparseLinear):
            tot += m.packed().nbytes()
        elif isinstance(m, nn.Linear) and m.weight is not model.get_output_embeddings().weight:
            tot += m.weight.numel() * m.weight.element_size()
    return tot


def cache_kwarg(model: nn.Module) -> str:
    """The name the model's forward takes its KV cache by: ``cache`` (transformers ≥ 5.2x, where
    ``past_key_values`` is deprecated) or ``past_key_values``."""
    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


@torch.no_grad()
def prefilled(model: nn.Module, batch: int, prompt_len: int, cache_len: int,
              vocab_hi: int = 1000) -> tuple[object, torch.Tensor, torch.Tensor]:
    """A static KV cache (``cache_len`` positions) after the prefill of a random prompt (seed 0), the greedy next
    token of each sequence (batch × 1) and the position it goes to: the state a decode step starts from."""
    from transformers import StaticCache

    dev = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=cache_len)
    ids = torch.randint(10, vocab_hi, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).to(dev)
    out = model(input_ids=ids, **{cache_kwarg(model): cache}, cache_position=torch.arange(prompt_len, device=dev),
                use_cache=True)
    return cache, out.logits[:, -1:].argmax(-1), torch.tensor([prompt_len], device=dev)


@torch.no_grad()
def decode_rate(model: nn.Module, batch: int, prompt_len: int, new_tokens: int, graphs: bool = True,
                vocab_hi: int = 1000, compile: bool | str = False) -> tuple[float, str]:
    """Greedy decode tokens/s (batch × new tokens / seconds) after a prefill of ``prompt_len``; returns the
    rate and the mode actually used (``cuda-graph`` or ``eager``, prefixed ``compiled+`` when the step was
    compiled). ``compile``: compile the decode step with ``torch.compile`` (True: Inductor; a string: that
    backend), whole-graph and with static shapes; the compilation runs during the warm-up, untimed. Without
    ``compile`` the step runs layerprune's fused RMSNorm / rotary kernels (:mod:`layerprune.engine.fused`),
    for the dense and the sparse model alike; compiled, Inductor fuses those itself."""
    from layerprune.engine.fused import fused_ops

    with fused_ops(model, next(model.parameters()).device, enabled=False if compile else None):
        return _decode_rate(model, batch, prompt_len, new_tokens, graphs, vocab_hi, compile)


WARMUP = 3  # eager steps before a capture (on a side stream, as torch.cuda.graphs asks), thrown away after
REAL_WARMUP = 1  # the same when they are a generation's own steps (step_runner's advance): each is a slow eager
# step, and one has already run every kernel once (Triton's compile, the launch plans) before the capture


def cache_counters(cache: object) -> list[tuple[object, torch.Tensor | None, int | None]]:
    """Each cache layer's fill counters, copied: transformers' static layers write a step's keys and values where
    their own ``cumulative_length`` (a tensor, advanced in place) points, not at the ``cache_position`` they are given;
    sliding-window layers also keep ``cumulative_length_int`` on the host."""
    out = []
    for layer in getattr(cache, "layers", []):
        t = getattr(layer, "cumulative_length", None)
        i = getattr(layer, "cumulative_length_int", None)
        out.append((layer, t.clone() if isinstance(t, torch.Tensor) else None, i if isinstance(i, int) else None))
    return out


def restore_counters(saved: list[tuple[object, torch.Tensor | None, int | None]]) -> None:
    """Put back what :func:`cache_counters` copied (the warm-up and capture steps advanced them)."""
    for layer, t, i in saved:
        if t is not None:
            layer.cumulative_length.copy_(t)
        if i is not None:
            layer.cumulative_length_int = i


def graph_safe(cache: object, length: int | None) -> bool:
    """Whether a replayed step keeps ``cache`` right up to position ``length``: a sliding-window layer decides on the
    host (its ``cumulative_length_int``) whether its window is full, which a replay would not redo, so it must not
    fill before ``length`` (unknown length: not safe)."""
    for layer in getattr(cache, "layers", []):
        if isinstance(getattr(layer, "cumulative_length_int", None), int):
            if length is None or length > getattr(layer, "max_cache_len", 0):
                return False
    return True


def step_runner(model: nn.Module, cache: object, tok: torch.Tensor, pos: torch.Tensor, graphs: bool = True,
                compile: bool | str = False, length: int | None = None,
                advance: Callable[[torch.Tensor], None] | None = None) -> tuple[Callable[[], torch.Tensor], str]:
    """``(run, mode)``: ``run()`` is one greedy decode step (the next token, batch × 1, of ``tok`` written at
    position ``pos`` of the static ``cache``; the caller moves ``tok`` and ``pos`` on), and ``mode`` how it runs:
    ``cuda-graph`` (captured once after ``WARMUP`` warm-up steps on a side stream, then replayed: the host does no work per
    step; the token it returns is one static tensor, overwritten by the next replay) or ``eager`` (``graphs`` off, not
    CUDA, a sliding-window cache that would fill before position ``length`` (:func:`graph_safe`), or a capture that
    failed: one warning), prefixed ``compiled+`` when ``compile`` (True: Inductor; a string: that backend) compiled
    the step first. The warm-up and capture steps advance the cache's fill counters; they are put back after, so the
    first replay writes at ``pos`` (what the warm-up steps wrote past it is masked, then overwritten). With
    ``advance`` the warm-up is one real decode step instead (``REAL_WARMUP``; three when compiled): its next token is
    handed to ``advance``, which moves ``tok`` and ``pos`` on as the caller's loop does, and only the capture's
    counters are put back (a generation does not pay eager steps it throws away)."""
    dev = next(model.parameters()).device
    kw = {cache_kwarg(model): cache}

    def step() -> torch.Tensor:
        return model(input_ids=tok, **kw, cache_position=pos, use_cache=True).logits[:, -1:].argmax(-1)

    if compile:
        step = torch.compile(step, backend="inductor" if compile is True else compile, fullgraph=True, dynamic=False)
    mode = "eager"
    run = step
    if graphs and dev.type == "cuda" and not graph_safe(cache, length):
        log.info("a sliding-window KV cache would fill before position %s: eager decode steps", length)
    elif graphs and dev.type == "cuda":
        saved = None if advance else cache_counters(cache)
        try:
            s = torch.cuda.Stream(dev)
            s.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(s):
                for _ in range(REAL_WARMUP if advance and not compile else WARMUP):
                    nxt = step()
                    if advance:
                        advance(nxt)
            torch.cuda.current_stream(dev).wait_stream(s)
            if advance:
                saved = cache_counters(cache)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                nxt_static = step()

            def replay() -> torch.Tensor:
                g.replay()
                return nxt_static

            run, mode = replay, "cuda-graph"
        except Exception as e:  # noqa: BLE001 - a model whose step cannot be captured runs eagerly
            log.warning("CUDA-graph capture failed (%s): running eager decode steps", str(e).splitlines()[0][:120])
            torch.cuda.synchronize(dev)
        finally:
            if saved is not None:
                restore_counters(saved)
    return run, ("compiled+" if compile else "") + mode


def _decode_rate(model: nn.Module, batch: int, prompt_len: int, new_tokens: int, graphs: bool, vocab_hi: int,
                 compile: bool | str) -> tuple[float, str]:
    dev = next(model.parameters()).device
    cache, tok, pos = prefilled(model, batch, prompt_len, prompt_len + new_tokens + 8, vocab_hi)
    run, mode = step_runner(model, cache, tok, pos, graphs, compile, length=prompt_len + new_tokens + 8)
    saved = cache_counters(cache)
    for _ in range(WARMUP):  # warm-up (each step advances the cache's fill counters: put back after, as step_runner does)
        run()
    restore_counters(saved)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(new_tokens):
        nxt = run()
        tok.copy_(nxt)
        pos.add_(1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return batch * new_tokens / (time.perf_counter() - t), mode


DEFAULT_PREFILL = 2048  # bench-decode's prompt length for the time to the first token, unless asked otherwise


def _longest_context(spec: str) -> int | None:
    """The model's context (:func:`layerprune.evaluation.perplexity.context_length`) from its config alone, before
    any weight is loaded; None when the config cannot be read."""
    from transformers import AutoConfig

    from layerprune.evaluation.perplexity import context_length

    try:
        return context_length(AutoConfig.from_pretrained(spec))
    except (OSError, ValueError):
        return None


@torch.no_grad()
def prefill_ms(model: nn.Module, tokens: int, reps: int = 3, vocab_hi: int = 1000) -> float:
    """Median milliseconds of one sequence's prefill of ``tokens`` random tokens (seed 0), the forward that
    ``generate`` runs before its first new token: logits of the last position only, eager, with layerprune's
    fused RMSNorm / rotary kernels as in :func:`decode_rate`. One untimed warm-up first (it also makes the cuSPARSELt
    plans of a 2:4 model). In the sparse model each linear unpacks its weight for cuBLAS at this many tokens
    (``SparseLinear``), once per call, or, in the nm24 layout from 1024 tokens on most shapes, runs cuSPARSELt."""
    from layerprune.engine.fused import fused_ops

    dev = next(model.parameters()).device
    ids = torch.randint(10, vocab_hi, (1, tokens), generator=torch.Generator().manual_seed(0)).to(dev)
    times = []
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda d: None)
    with fused_ops(model, dev):
        for i in range(reps + 1):
            sync(dev)
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            sync(dev)
            if i:
                times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def bench_decode(spec: str, batch_sizes: list[int], new_tokens: int = 64, prompt_len: int = 32,
                 device: str = "auto", dtype: str = "bfloat16", graphs: bool = True, layout: str = "delta",
                 compile: bool = False, merge: bool = True, prefill_tokens: list[int] | None = None) -> dict:
    """Dense vs sparse decode tokens/s for a sparse directory or a ``prune --out`` directory (``compile``: see
    :func:`decode_rate`), and the prefill of each of ``prefill_tokens`` prompt lengths (``None``: 2048, or the
    model's ``max_position_embeddings`` when that is shorter; an empty list: none) (:func:`prefill_ms`: the
    time to the first token of one sequence, dense vs sparse; the record's ``prefill`` rows).

    With ``merge`` (the default) the sparse model runs the linears that read one input stacked
    (:mod:`layerprune.sparse.merge`), as ``generate`` does. The dense model is measured as Hugging Face builds
    it (``speedup``) and then stacked the same way (``dense_merged_tok_s``, ``speedup_vs_dense_merged``), so
    that the table shows what the stacking alone gives."""
    from layerprune.export import is_layerprune_dir
    from layerprune.models.loading import parse_dtype
    from layerprune.sparse.export import check_layout, densify, is_sparse_dir, load_sparse, sparsify
    from layerprune.sparse.merge import merge_siblings
    from layerprune.utils import resolve_device

    check_layout(layout)
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError("--batch-sizes must be positive integers, e.g. 1,4,16")
    if new_tokens < 1 or prompt_len < 1:
        raise UserError("--new-tokens and --prompt-len must be at least 1")
    asked = prefill_tokens is not None
    prefill_tokens = list(prefill_tokens or [])
    if any(t < 1 for t in prefill_tokens):
        raise UserError("--prefill-tokens must be positive integers, e.g. 512,2048 (or empty for none)")
    if not (Path(spec).is_dir() and (is_sparse_dir(spec) or is_layerprune_dir(spec))):
        raise UserError(f"{spec} is neither a sparse directory (layerprune export) nor a layerprune output directory")
    longest = _longest_context(spec)
    if not asked:
        prefill_tokens = [min(DEFAULT_PREFILL, longest or DEFAULT_PREFILL)]
    if prefill_tokens and longest and max(prefill_tokens) > longest:
        raise UserError(f"--prefill-tokens {max(prefill_tokens)} is longer than the model's {longest} positions "
                        f"(max_position_embeddings in {Path(spec) / 'config.json'}): ask for at most {longest}")
    dev = resolve_device(device)
    if dev.type != "cuda":
        raise UserError("bench-decode measures GPU decode: it needs a CUDA device (--device cuda)")
    dt = parse_dtype("bfloat16" if dtype == "float32" else dtype)  # decode is measured in 16-bit
    if is_sparse_dir(spec):
        sparse = load_sparse(spec, device=dev, dtype=dt)
        dense = densify(copy.deepcopy(sparse))
    else:
        from transformers import AutoModelForCausalLM

        dense = AutoModelForCausalLM.from_pretrained(spec, dtype=dt).to(dev).eval()
        sparse = copy.deepcopy(dense)
        sparsify(sparse, layout=layout)
    rows = [{"batch": b} for b in batch_sizes]
    pre = [{"tokens": t} for t in prefill_tokens]
    for r in rows:
        r["dense_tok_s"], mode = decode_rate(dense, r["batch"], prompt_len, new_tokens, graphs, compile=compile)
    for r in pre:
        r["dense_ms"] = prefill_ms(dense, r["tokens"])
    merged = merge_siblings(sparse) if merge else []
    if merged:
        merge_siblings(dense)  # in place: no third copy of the model
        for r in rows:
            r["dense_merged_tok_s"], _ = decode_rate(dense, r["batch"], prompt_len, new_tokens, graphs, compile=compile)
        for r in pre:
            r["dense_merged_ms"] = prefill_ms(dense, r["tokens"])
    for r in rows:
        r["sparse_tok_s"], smode = decode_rate(sparse, r["batch"], prompt_len, new_tokens, graphs, compile=compile)
        r["speedup"] = r["sparse_tok_s"] / r["dense_tok_s"]
        if merged:
            r["speedup_vs_dense_merged"] = r["sparse_tok_s"] / r["dense_merged_tok_s"]
        r["mode"] = f"{mode}/{smode}"
    for r in pre:
        r["sparse_ms"] = prefill_ms(sparse, r["tokens"])
        r["speedup"] = r["dense_ms"] / r["sparse_ms"]
        if merged:
            r["speedup_vs_dense_merged"] = r["dense_merged_ms"] / r["sparse_ms"]
    return {"model": spec, "device": torch.cuda.get_device_name(dev), "dtype": str(dt).replace("torch.", ""),
            "mode": rows[0]["mode"], "new_tokens": new_tokens, "prompt_len": prompt_len, "rows": rows, "prefill": pre,
            "dense_weight_bytes": weight_bytes(dense), "sparse_weight_bytes": weight_bytes(sparse),
            "layout": sorted({m.layout for m in sparse.modules() if hasattr(m, "layout")}),
            "merged_groups": len(merged),
            "torch": torch.__version__}
