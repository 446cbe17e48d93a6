"""Tokenise the calibration set and the evaluation texts on a background thread while the weights load.

``prune`` starts the thread as soon as the tokenizer is loaded (:func:`start`); the tokenizer's Rust core
releases the GIL, so the sampling and the evaluation windows overlap reading the checkpoint into the GPU
(on a LLaMA-2-7B-sized model: C4 sampling and WikiText-2 tokenisation, ~2 s of CPU, against ~3 s of
weight loading). The results are those of the same calls on the main thread: the jobs *are* those calls.

One rule keeps the tokenizer single-threaded: every layerprune function that tokenises first calls
:func:`settle`, which waits for the thread to finish (a no-op when none runs, or on the thread itself).
:func:`take` waits only for its own job, since taking a result does not tokenise.
A job that fails leaves no result, so the consumer repeats the call and the error surfaces where it
always did.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, Callable

log = logging.getLogger("layerprune")


class _Run:
    def __init__(self, jobs: dict[Any, Callable[[], Any]]) -> None:
        self.results: dict[Any, Any] = {}
        self.done = {key: threading.Event() for key in jobs}
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._work, args=(jobs,), name="layerprune-prefetch", daemon=True)

    def _work(self, jobs: dict[Any, Callable[[], Any]]) -> None:
        t = time.perf_counter()
        for key, fn in jobs.items():
            try:
                self.results[key] = fn()
            except Exception as e:  # noqa: BLE001 - the consumer repeats the call and reports it
                log.debug("prefetch of %s failed (%s); it runs again when needed", key, e)
            finally:
                self.done[key].set()
        self.seconds = time.perf_counter() - t
        WAITED["prefetch_seconds"] = self.seconds


_RUNS: "weakref.WeakKeyDictionary[Any, _Run]" = weakref.WeakKeyDictionary()
WAITED: dict[str, float] = {}  # the last run's figures, for the run record


def _get(tokenizer) -> _Run | None:
    try:
        return _RUNS.get(tokenizer)
    except TypeError:  # an object that takes no weak reference never has jobs
        return None


def start(tokenizer, jobs: dict[Any, Callable[[], Any]]) -> None:
    """Run ``jobs`` (key → call) one after another on a background thread; their tokenizer is ``tokenizer``
    (one that takes no weak reference gets no thread: the calls then run where they are needed)."""
    settle(tokenizer)
    run = _Run(jobs)
    try:
        _RUNS[tokenizer] = run
    except TypeError:
        return
    WAITED.clear()
    run.thread.start()


def settle(tokenizer) -> None:
    """Wait for ``tokenizer``'s background jobs, if any (not on their own thread)."""
    run = _get(tokenizer)
    if run is None or run.thread is threading.current_thread() or not run.thread.is_alive():
        return
    t = time.perf_counter()
    run.thread.join()
    WAITED["prefetch_wait_seconds"] = WAITED.get("prefetch_wait_seconds", 0.0) + time.perf_counter() - t


def take(tokenizer, key) -> Any:
    """The result of job ``key``, once (waiting for that job only: the calibration set is taken while the
    evaluation texts are still being tokenised); None when there is none. When there is none the caller
    tokenises itself, so then every job is waited for first."""
    run = _get(tokenizer)
    if run is None:
        return None
    ev = run.done.get(key)
    if ev is not None and run.thread is not threading.current_thread():
        t = time.perf_counter()
        ev.wait()
        WAITED["prefetch_wait_seconds"] = WAITED.get("prefetch_wait_seconds", 0.0) + time.perf_counter() - t
    out = run.results.pop(key, None)
    if out is None:
        settle(tokenizer)
    return out
