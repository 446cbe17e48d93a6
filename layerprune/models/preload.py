"""Read a local safetensors checkpoint onto the GPU on a background thread while Python imports transformers.

A LLaMA-2-7B-sized prune spends its first seconds in two things that do not depend on each other: importing
transformers' model classes (5–6 s on the H200 machine; Python, so it holds the GIL) and reading 13.5 GB of
weights onto the GPU (3–3.6 s through ``from_pretrained``). Reading a file into pinned memory and copying it
to the GPU release the GIL, so a thread can do the second during the first. The command line starts it right
after parsing its arguments (:func:`start`); :func:`loading.load_model` takes the tensors (:func:`take`)
and puts them into a model built from the config on the meta device (:func:`loading.from_preloaded`).

Only what ``from_pretrained`` would load unchanged is read this way: a local directory's
``model.safetensors`` (or the shards of its index), onto a GPU where the model fits
(:func:`loading.load_placement`), in one process. Anything else, or a read that fails, leaves the ordinary
``from_pretrained`` path to do the load (and report any error) as before.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger("layerprune")

# safetensors dtype names → torch dtypes (the ones transformers checkpoints hold)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
CHUNK = 128 << 20  # bytes a pinned staging buffer holds; two of them alternate
SWITCH_S = 0.0005  # the interpreter's thread switch interval while a read runs (default 0.005)


def read_safetensors(path: Path, device: torch.device, dtype: torch.dtype | None = None,
                     stream: torch.cuda.Stream | None = None, staging: list[torch.Tensor] | None = None,
                     stop: threading.Event | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, on ``device``; floating ones converted to ``dtype`` (None: as
    stored). The data section is read in order into the ``staging`` buffers (on a GPU by default two pinned
    buffers of :data:`CHUNK` bytes), which take turns: each piece is copied on ``stream`` into the tensors it
    overlaps while the next is read. On the CPU without ``staging`` the file is read straight into each tensor.
    ``stop`` set: the read ends (InterruptedError) before its next piece."""
    from layerprune.models.loading import _safetensors_header

    cuda = device.type == "cuda"
    n, head = _safetensors_header(path)
    entries = sorted(head.items(), key=lambda kv: kv[1]["data_offsets"][0])
    with open(path, "rb", buffering=0) as f:
        for k, v in entries:
            if v["dtype"] not in DTYPES:
                raise ValueError(f"{path.name}: tensor {k} has dtype {v['dtype']}, which is not read here")
        flat = {k: torch.empty(v["data_offsets"][1] - v["data_offsets"][0], dtype=torch.uint8, device=device)
                for k, v in entries}
        base = 8 + n
        if not cuda and staging is None:
            for k, v in entries:
                f.seek(base + v["data_offsets"][0])
                _read_exact(f, flat[k].numpy())
        else:
            total = max((v["data_offsets"][1] for _, v in entries), default=0)
            bufs = staging or [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            done = [torch.cuda.Event() if cuda else None for _ in bufs]
            f.seek(base)
            pos, first, k = 0, 0, 0
            while pos < total:
                if stop is not None and stop.is_set():
                    raise InterruptedError(f"reading {path.name} was stopped")
                buf, ev = bufs[k % len(bufs)], done[k % len(bufs)]
                if ev is not None:
                    ev.synchronize()  # the copies out of this buffer, len(bufs) pieces ago, have finished
                m = min(buf.numel(), total - pos)
                _read_exact(f, buf[:m].numpy())
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    j = first  # the tensors that overlap [pos, pos + m)
                    while j < len(entries) and entries[j][1]["data_offsets"][0] < pos + m:
                        name, (o, e) = entries[j][0], entries[j][1]["data_offsets"]
                        lo, hi = max(o, pos), min(e, pos + m)
                        if hi > lo:
                            flat[name][lo - o:hi - o].copy_(buf[lo - pos:hi - pos], non_blocking=cuda)
                        j += 1
                    if ev is not None:
                        ev.record(stream)
                while first < len(entries) and entries[first][1]["data_offsets"][1] <= pos + m:
                    first += 1
                pos += m
                k += 1
            if cuda:
                (stream or torch.cuda.current_stream(device)).synchronize()
    out = {}
    for k, v in entries:
        t = flat.pop(k).view(DTYPES[v["dtype"]]).view(v["shape"])
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        out[k] = t
    return out


def _read_exact(f, arr) -> None:
    view = memoryview(arr).cast("B")
    got = 0
    while got < len(view):
        r = f.readinto(view[got:])
        if not r:
            raise EOFError(f"{f.name} ends early")
        got += r


class Preload:
    """The weights of one local checkpoint, read onto ``device`` by a daemon thread."""

    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device) -> None:
        self.key = (str(folder.resolve()), dtype, str(device))
        self.folder, self.dtype, self.device = folder, dtype, device
        self.tensors: dict[str, torch.Tensor] | None = None
        self.seconds = 0.0
        self.place: torch.device | None = None  # load_placement's answer, set before the read starts
        self.placed = threading.Event()
        self.stop = threading.Event()  # set by discard(): the read ends at its next piece
        self.thread = threading.Thread(target=self._work, name="layerprune-preload", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        from layerprune.models.loading import checkpoint_files, load_placement

        t = time.perf_counter()
        # This thread takes the GIL back after every read and copy; with the default 5 ms switch interval it
        # waits up to that long each time while the main thread imports (measured: 8.3 s for 13.5 GB that
        # from_pretrained reads in 3.6 s), so hand it over sooner while the read runs.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, SWITCH_S))
        try:
            files = checkpoint_files(self.folder)
            self.place = load_placement(str(self.folder), self.dtype, self.device)
            self.placed.set()
            if files is None or self.place.type != "cuda":
                return
            with torch.cuda.device(self.device):
                stream = torch.cuda.Stream()
                staging = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
                out: dict[str, torch.Tensor] = {}
                for p in files:
                    out.update(read_safetensors(p, self.device, self.dtype, stream, staging, self.stop))
                torch.cuda.current_stream().wait_stream(stream)
            self.tensors = out
        except Exception as e:  # noqa: BLE001 - from_pretrained then loads it (and reports any error)
            log.debug("preloading %s failed (%s); from_pretrained loads it", self.folder, e)
            self.tensors = None
        finally:
            sys.setswitchinterval(interval)
            self.placed.set()
            self.seconds = time.perf_counter() - t


_PENDING: dict[tuple, Preload] = {}


def start(spec: str, dtype: torch.dtype, device: torch.device) -> "Preload | None":
    """Begin reading ``spec``'s weights onto ``device`` when it is a local checkpoint directory, ``device`` a
    GPU, this is one process (not a data-parallel rank) and ``LAYERPRUNE_PRELOAD`` is not ``0``. Returns the
    pending read (the CUDA context then exists), or None."""
    import os

    if (device.type != "cuda" or int(os.environ.get("WORLD_SIZE", "1")) > 1 or not torch.cuda.is_available()
            or os.environ.get("LAYERPRUNE_PRELOAD") == "0"):
        return None
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file() or (folder / "sparse_config.json").is_file():
        return None
    torch.cuda.mem_get_info(device)  # create the CUDA context here: that holds the GIL, which on the thread stalls imports
    p = Preload(folder, dtype, device)
    _PENDING[p.key] = p
    return p


def placement(spec: str, dtype: torch.dtype, device: torch.device) -> torch.device | None:
    """Where a pending preload of ``spec`` decided the weights go (:func:`loading.load_placement`, decided
    before the read began, with the GPU's memory still free); None when none is pending."""
    p = _PENDING.get((str(Path(spec).expanduser().resolve()), dtype, str(device)))
    if p is None:
        return None
    p.placed.wait()
    return p.place


def take(folder: Path, dtype: torch.dtype, device: torch.device) -> tuple[dict[str, torch.Tensor] | None, float, float]:
    """``(tensors, seconds the thread took, seconds waited for it)`` of a preload of exactly this checkpoint,
    dtype and device, once (``(None, 0, 0)`` when there is none or it failed). Other preloads are dropped."""
    key = (str(Path(folder).resolve()), dtype, str(device))
    p = _PENDING.pop(key, None)
    discard()
    if p is None:
        return None, 0.0, 0.0
    t = time.perf_counter()
    p.thread.join()
    return p.tensors, p.seconds, time.perf_counter() - t


def discard() -> None:
    """Drop every preload not taken: its read stops at the next piece, and once its thread has ended its GPU
    memory is free."""
    while _PENDING:
        _, p = _PENDING.popitem()
        p.stop.set()
        p.thread.join()
        p.tensors = None
