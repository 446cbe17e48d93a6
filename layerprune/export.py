"""Writing results: the output directory (atomic, resumable) and the HF export of a pruned model.

A run with ``--out DIR`` works in ``.DIR.partial`` next to it, which it holds under an exclusive lock:
finished blocks are checkpointed there (``blocks/block_<i>.safetensors`` + records, each carrying a hash
of the run's arguments); a rerun with the same arguments verifies them and continues from the last
finished block. The final model (safetensors, config,
tokenizer) and ``layerprune.json`` are written into the partial directory, which is renamed to DIR
only when complete, so an interrupted run never leaves a model that looks finished.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from layerprune.errors import RunFailure, UserError
from layerprune.utils import write_atomic

log = logging.getLogger("layerprune")

RECORD = "layerprune.json"


def check_out_dir(out: str | Path) -> Path:
    """``out`` must not exist, or be empty, and its location must be writable: never overwrite anything.
    Nothing is created here."""
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty: choose a new directory or remove it")
    anc = p.absolute().parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"--out {out}: {anc} is a file, not a directory: choose another location")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: no permission to write in {anc}: choose a writable location")
    return p


def _disk_full(e: OSError, where: Path, need: int | None = None) -> RunFailure:
    more = f" (the run needs about {need / 2**30:.2f} GiB there)" if need else ""
    return RunFailure(f"disk full while writing {where}{more}: free some space and rerun the same command "
                      "to resume from the last finished block")


def _write_or_fail(where: Path, write: Callable[[Path], None], need: int | None = None) -> None:
    """``write(tmp)`` then rename to ``where``; a full disk removes the temporary and raises RunFailure."""
    tmp = where.with_name(f".{where.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, where)
    except OSError as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise _disk_full(e, where, need) from None
        raise


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


class RunDir:
    """Resumable, atomic output directory (implements the engine's checkpoint protocol).

    ``.DIR.partial`` is held under an exclusive ``flock`` for the whole run, so a second run on the same
    ``--out`` refuses (naming the other process) instead of writing into it. Every block checkpoint
    carries the run's argument hash; before resuming, each one is checked (present, readable, its
    tensors' shapes those of the block) and a damaged one is refused. Free space is checked before the
    first block against what the run will write (a checkpoint per block, then the final model)."""

    def __init__(self, out: str | Path, args_hash: str, model: nn.Module | None = None) -> None:
        self.out = check_out_dir(out)
        self.partial = self.out.parent / f".{self.out.name}.partial"
        self.args_hash = args_hash
        self.done = 0
        self.created = not self.partial.exists()
        try:
            (self.partial / "blocks").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {out}: cannot create {self.partial} ({e.strerror})") from None
        self._lock()
        try:
            self._open(model)
        except BaseException:
            self.abandon()
            raise

    def _open(self, model: nn.Module | None) -> None:
        self.adapter = None
        if model is not None:
            from layerprune.models.adapter import ModelAdapter

            self.adapter = ModelAdapter.of(model)
        args_hash = self.args_hash
        state = self.partial / "progress.json"
        if state.is_file():
            try:
                st = json.loads(state.read_text())
            except ValueError:
                st = {}
            if st.get("args_hash") == args_hash:
                self.done = int(st.get("done", 0))
                self._verify(self.done)
                log.info("resuming %s: %d blocks already pruned", self.out, self.done)
            else:
                log.warning("%s holds a stopped run with other arguments: starting afresh", self.partial)
                self._clear()
        self.need = self._check_space(model)
        self._write_state()

    # ------------------------------------------------------------------ lock
    def _lock(self) -> None:
        self._fd = os.open(self.partial, os.O_RDONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            try:
                pid = json.loads((self.partial / "owner.json").read_text()).get("pid")
            except (OSError, ValueError):
                pid = "?"
            raise UserError(f"another layerprune run (pid {pid}) is writing {self.partial}: wait for it to finish, "
                            "or choose another --out") from None
        write_atomic(self.partial / "owner.json", json.dumps({"pid": os.getpid(), "args_hash": self.args_hash}))

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def abandon(self) -> None:
        """A refused or failed run that finished no block leaves no directory behind it (if it made it)."""
        if self.created and self.done == 0 and self.partial.exists() and not list((self.partial / "blocks").glob("*")):
            shutil.rmtree(self.partial, ignore_errors=True)
        self.close()

    def _clear(self) -> None:
        for p in self.partial.iterdir():
            if p.name != "owner.json":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        (self.partial / "blocks").mkdir(exist_ok=True)

    # ------------------------------------------------------------------ checks
    def _damaged(self, f: Path, why: str) -> UserError:
        return UserError(f"checkpoint {f} is damaged ({why}): delete {self.partial} to start the run again")

    def _verify(self, done: int) -> None:
        from safetensors import safe_open

        for i in range(done):
            jf, sf = self.partial / "blocks" / f"block_{i}.json", self.partial / "blocks" / f"block_{i}.safetensors"
            for f in (jf, sf):
                if not f.is_file():
                    raise self._damaged(f, "missing")
            try:
                rec = json.loads(jf.read_text())
            except ValueError:
                raise self._damaged(jf, "not valid JSON") from None
            if rec.get("args_hash") != self.args_hash:
                raise self._damaged(jf, "written by a run with other arguments")
            try:
                with safe_open(str(sf), framework="pt") as fh:
                    shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
            except Exception as e:  # noqa: BLE001 - truncated / corrupt safetensors
                raise self._damaged(sf, f"unreadable: {type(e).__name__}") from None
            if self.adapter is not None:
                want = {k: tuple(v.shape) for k, v in self.adapter.blocks[i].state_dict().items()}
                if shapes != want:
                    raise self._damaged(sf, "its tensors do not match the model's block")

    def _check_space(self, model: nn.Module | None) -> int | None:
        if model is None:
            return None
        total = model_bytes(model)
        blocks = [sum(t.numel() * t.element_size() for t in b.state_dict().values()) for b in self.adapter.blocks]
        need = sum(blocks[self.done:]) + total
        free = shutil.disk_usage(self.partial).free
        if free < need * 1.02:
            raise UserError(f"--out {self.out}: the run writes about {need / 2**30:.2f} GiB (a checkpoint per block, "
                            f"then the final model) but only {free / 2**30:.2f} GiB are free there: free space or "
                            "choose another --out")
        return need

    # ------------------------------------------------------------------ protocol
    def _write_state(self) -> None:
        write_atomic(self.partial / "progress.json", json.dumps({"args_hash": self.args_hash, "done": self.done}))

    def save_block(self, i: int, block: nn.Module, record: dict) -> None:
        sd = {k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        d = self.partial / "blocks"
        _write_or_fail(d / f"block_{i}.safetensors", lambda p: save_file(sd, str(p)), self.need)
        rec = json.dumps({**record, "args_hash": self.args_hash})
        _write_or_fail(d / f"block_{i}.json", lambda p: p.write_text(rec), self.need)
        self.done = i + 1
        try:
            self._write_state()
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise _disk_full(e, self.partial / "progress.json", self.need) from None
            raise

    def block_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Block ``i``'s checkpointed tensors (keys relative to the block)."""
        return load_file(str(self.partial / "blocks" / f"block_{i}.safetensors"))

    def load_block(self, i: int, block: nn.Module) -> dict:
        sd = load_file(str(self.partial / "blocks" / f"block_{i}.safetensors"))
        dev = next(block.parameters()).device
        block.load_state_dict({k: v.to(dev) for k, v in sd.items()})
        return json.loads((self.partial / "blocks" / f"block_{i}.json").read_text())

    def finalize(self, model: nn.Module, tokenizer, record: dict, extra_files: dict[str, bytes] | None = None,
                 before_rename=None, writer: Callable[[nn.Module, Any, Path], None] | None = None) -> Path:
        """Write the final model (``writer``, default :func:`save_model`), ``layerprune.json`` and any extra
        files into the partial directory, then rename it to DIR in one step."""
        final = self.partial / "model"
        if final.exists():
            shutil.rmtree(final)

        def write(tmp: Path) -> None:
            (writer or save_model)(model, tokenizer, tmp)
            (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str))
            for name, data in (extra_files or {}).items():
                (tmp / name).write_bytes(data)
            if before_rename is not None:
                before_rename(tmp)

        _write_or_fail(final, write, self.need)
        if self.out.exists():
            self.out.rmdir()  # empty (checked at start)
        final.rename(self.out)
        self.close()
        shutil.rmtree(self.partial, ignore_errors=True)
        return self.out


@contextmanager
def open_run_dir(out: str | Path | None, args_hash: Callable[[], str], model: nn.Module | None = None
                 ) -> Iterator[RunDir | None]:
    """The run's output directory for the duration of a ``with`` block (``None`` without ``out``): locked,
    and, if the run stops before its first block is saved, removed again (no debris on refusal)."""
    if out is None:
        yield None
        return
    rd = RunDir(out, args_hash(), model)
    try:
        yield rd
    except BaseException:
        rd.abandon()
        raise
    finally:
        rd.close()


def save_model(model: nn.Module, tokenizer, path: str | Path) -> None:
    """Plain HF safetensors with zeros kept (loads with ``AutoModelForCausalLM.from_pretrained``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.to("cpu")
    qc = getattr(model.config, "quantization_config", None)
    if qc is not None and "gguf" in str(qc).lower():  # dequantised GGUF: plain weights, drop the marker
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def sparse_size_bytes(model: nn.Module, linear_names: list[str], bits: int | None = None,
                      group_size: int | None = None) -> dict:
    """On-disk size estimate of the pruned linears as a bitmask + values (fp values, or ``bits``-bit
    integers plus an fp16 scale and an int8 zero point per group of ``group_size`` inputs) vs dense."""
    mods = dict(model.named_modules())
    dense = sparse = 0.0
    for n in linear_names:
        w = mods[n].weight
        rows, cols = w.shape
        dense += w.numel() * w.element_size()
        nnz = int((w != 0).sum())
        sparse += w.numel() / 8 + nnz * ((bits / 8) if bits else w.element_size())
        if bits:
            sparse += rows * -(-cols // (group_size or cols)) * 3
    return {"dense_bytes": int(dense), "bitmask_bytes": int(sparse), "ratio": sparse / max(dense, 1)}


def is_layerprune_dir(path: str | Path) -> bool:
    return (Path(path) / RECORD).is_file() and (Path(path) / "config.json").is_file()


def load_record(path: str | Path) -> dict:
    if not is_layerprune_dir(path):
        raise UserError(f"{path} is not a layerprune output directory (no {RECORD}): run `layerprune prune ... --out DIR` first")
    return json.loads((Path(path) / RECORD).read_text())


def load_pruned(path: str | Path, trust_remote_code: bool = False):
    """``(model, tokenizer)`` of a ``prune --out`` directory, fp32, in eval mode (finetune / quantize read it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code).eval()
        return model, AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"{path} does not hold a model transformers can load: {str(e).splitlines()[0][:120]}") from None


def torch_dtype_name(t: torch.dtype) -> str:
    return str(t).replace("torch.", "")
