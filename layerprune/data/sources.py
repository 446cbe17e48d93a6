"""Evaluation and calibration text: WikiText-2, C4 and PTB, local first, then the hub.

Local layout (``$LAYERPRUNE_DATA`` or ``--data-dir``; see shared/data/README.md):
``wikitext2/wikitext2_raw_v1_{test,validation}.json``, ``c4/c4_{calib,eval}.jsonl.gz``,
``ptb/ptb.{test,valid}.txt``. Without a local copy the same rows come from the Hugging Face hub
through ``datasets`` (the real path for users).
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from layerprune.errors import UserError


def data_dir(explicit: str | Path | None = None) -> Path | None:
    """The local data directory: ``explicit`` (the CLI's ``--data-dir``, passed down by the caller),
    else ``$LAYERPRUNE_DATA``, else ``./shared/data`` / ``../shared/data``, else ``None`` (the hub)."""
    if explicit is not None:
        if not Path(explicit).is_dir():
            raise UserError(f"--data-dir {explicit} is not a directory")
        return Path(explicit)
    env = os.environ.get("LAYERPRUNE_DATA")
    if env:
        if not Path(env).is_dir():
            raise UserError(f"LAYERPRUNE_DATA={env} is not a directory")
        return Path(env)
    for cand in (Path("shared/data"), Path("../shared/data")):
        if (cand / "wikitext2").is_dir():
            return cand.resolve()
    return None


@dataclass(frozen=True)
class Source:
    """A text source: how to read its rows locally and from the hub, and how to join them for PPL."""

    name: str
    local: dict[str, str]  # split -> relative path
    joiner: str  # the reference protocol's join for perplexity
    hub: Callable[[str], list[str]]
    doc: str


def _hub_wikitext(split: str) -> list[str]:
    from datasets import load_dataset

    return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])


def _hub_c4(split: str) -> list[str]:
    from datasets import load_dataset

    if split == "calib":
        ds = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    else:
        ds = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation")
        ds = ds.select(range(1100))
    return list(ds["text"])


def _hub_ptb(split: str) -> list[str]:
    from datasets import load_dataset

    return list(load_dataset("ptb_text_only", "penn_treebank", split="test" if split == "test" else "validation")["sentence"])


SOURCES: dict[str, Source] = {
    "wikitext2": Source("wikitext2", {"test": "wikitext2/wikitext2_raw_v1_test.json",
                                      "validation": "wikitext2/wikitext2_raw_v1_validation.json"},
                        "\n\n", _hub_wikitext, "WikiText-2 raw; rows joined with '\\n\\n' (test split by default)"),
    "c4": Source("c4", {"calib": "c4/c4_calib.jsonl.gz", "eval": "c4/c4_eval.jsonl.gz"}, " ", _hub_c4,
                 "C4 en; 'calib' documents for calibration, 'eval' documents joined with ' ' for perplexity"),
    "ptb": Source("ptb", {"test": "ptb/ptb.test.txt", "validation": "ptb/ptb.valid.txt"}, " ", _hub_ptb,
                  "Penn Treebank (Mikolov); stripped sentences joined with ' '"),
}
DEFAULT_EVAL_SPLIT = {"wikitext2": "test", "c4": "eval", "ptb": "test"}


def calib_split(source: str) -> str:
    """The split a source's calibration / training text comes from (never an evaluation split)."""
    return "calib" if source == "c4" else "validation"


def _read_local(path: Path) -> list[str]:
    try:
        if path.name.endswith(".jsonl.gz"):
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return [json.loads(line)["text"] for line in fh if line.strip()]
        if path.suffix == ".json":
            return list(json.loads(path.read_text(encoding="utf-8")))
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:  # truncated, corrupt or not text
        raise UserError(f"{path} is damaged or not in the expected format ({type(e).__name__}): "
                        "restore it from shared/data, or remove it to read the dataset from the hub") from None


def check_datasets(names: Iterable[str]) -> list[str]:
    """The dataset names of a comma list (empty entries dropped); an unknown one is one clear error."""
    out = [d.strip() for d in names if d and d.strip()]
    for d in out:
        if d not in SOURCES:
            raise UserError(f"unknown dataset '{d}': use one of {', '.join(SOURCES)}")
    return out


def load_documents(name: str, split: str | None = None, data_dir_: str | Path | None = None) -> list[str]:
    """Rows of a source split, from the local data directory if it has them, else from the hub."""
    if name not in SOURCES:
        raise UserError(f"unknown dataset '{name}': use one of {', '.join(SOURCES)}")
    src = SOURCES[name]
    split = split or DEFAULT_EVAL_SPLIT[name]
    if split not in src.local:
        raise UserError(f"dataset {name} has no split '{split}': use one of {', '.join(src.local)}")
    root = data_dir(data_dir_)
    if root is not None and (root / src.local[split]).is_file():
        return _read_local(root / src.local[split])
    try:
        return src.hub(split)
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes one clear line
        raise UserError(
            f"dataset {name}/{split} is not in a local data directory and could not be fetched from the hub "
            f"({type(e).__name__}); set LAYERPRUNE_DATA or --data-dir to a folder laid out like shared/data"
        ) from None


def load_text(name: str, split: str | None = None, data_dir_: str | Path | None = None) -> str:
    """The evaluation text of a source, joined as the reference perplexity protocol joins it."""
    if name not in SOURCES:
        load_documents(name)  # raises the unknown-dataset error
    return SOURCES[name].joiner.join(load_documents(name, split, data_dir_))
