"""Read the files a command is about to import into the OS page cache, in parallel, before Python imports them.

Why: on a freshly started machine Python's imports (torch, transformers) read thousands of files one after another,
each a cold read; the CLI's start-up and imports took 10–12 s of a 40 s 7B prune (BENCHMARKS.md, session 22). A
pool of threads reading the same files ahead of the importer turns those serial cold reads into parallel ones
(``os.read`` releases the GIL). Standard library only: it runs before ``import torch``.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from concurrent.futures import ThreadPoolExecutor

PACKAGES = ("torch", "transformers", "triton", "safetensors", "tokenizers", "numpy", "sympy", "jinja2", "huggingface_hub",
            "networkx", "regex", "yaml", "tqdm", "filelock", "fsspec", "packaging", "typing_extensions", "mpmath")
SUFFIXES = (".pyc", ".so")


def package_files(names=PACKAGES) -> list[str]:
    """The compiled modules and shared libraries of the installed packages ``names`` (none imported): the small
    ``.pyc`` files first, then shared libraries smallest first, so that what the importer needs early lands early."""
    small, libs = [], []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        roots = list(spec.submodule_search_locations or []) if spec else []
        for root in roots:
            for d, _, files in os.walk(root):
                for f in files:
                    if f.endswith(".pyc"):
                        small.append(os.path.join(d, f))
                    elif ".so" in f:
                        libs.append(os.path.join(d, f))
    libs.sort(key=lambda p: os.path.getsize(p) if os.path.exists(p) else 0)
    return small + libs


class Handle:
    def __init__(self) -> None:
        self.bytes = 0
        self.files = 0
        self._thread: threading.Thread | None = None

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


def _read(path: str) -> int:
    n = 0
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    try:
        while True:
            b = os.read(fd, 1 << 22)
            if not b:
                return n
            n += len(b)
    except OSError:
        return n
    finally:
        os.close(fd)


def start(names=PACKAGES, workers: int = 16) -> Handle:
    """Start reading in the background (a daemon thread driving a pool of ``workers``); returns at once."""
    h = Handle()

    def run() -> None:
        files = package_files(names)
        with ThreadPoolExecutor(workers) as pool:
            for n in pool.map(_read, files, chunksize=16):
                h.bytes += n
                h.files += 1

    h._thread = threading.Thread(target=run, name="layerprune-preread", daemon=True)
    h._thread.start()
    return h
