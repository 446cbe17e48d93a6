"""Calibration sampling with the reference protocol (SparseGPT/Wanda/OWL/DLP ``get_c4``).

Python's ``random`` is seeded; repeatedly a random document is drawn until its token count is
strictly greater than ``seqlen``; a window of ``seqlen`` tokens starts uniformly in ``[0, T - seqlen - 1]``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import torch

from layerprune.data import prefetch
from layerprune.data.sources import calib_split, load_documents
from layerprune.errors import UserError


@dataclass
class CalibSet:
    """``input_ids`` of shape (nsamples, seqlen) plus what produced them (for records and cache keys)."""

    input_ids: torch.Tensor
    source: str
    seed: int
    doc_ids: list[int] = field(default_factory=list)

    @property
    def nsamples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.input_ids.shape[1])

    def fingerprint(self) -> str:
        return hashlib.sha256(self.input_ids.numpy().tobytes()).hexdigest()[:16]


AHEAD = 64  # documents the sampler may draw next, tokenised together when it meets one not yet tokenised


def _tokenize_ahead(docs: list[str], tokenizer, rng: random.Random, i: int, exclude: set[int],
                    cache: dict[int, torch.Tensor]) -> None:
    """Tokenise document ``i`` and the documents the sampler would draw after it if none of them were long
    enough (a copy of ``rng`` replays those draws), in one batched call: the tokenizer's Rust core then runs
    them in parallel, where one call per document spent most of its time in Python. The sampler itself is
    unchanged, so it draws exactly what it drew before; a guess that turns out wrong only tokenises a document
    early (it stays cached) or for nothing."""
    ahead = random.Random()
    ahead.setstate(rng.getstate())
    want = [i]
    for _ in range(AHEAD - 1):
        j = ahead.randint(0, len(docs) - 1)
        if j not in exclude and j not in cache and j not in want:
            want.append(j)
    enc = tokenizer([docs[j] for j in want])["input_ids"]
    for j, e in zip(want, enc):
        cache[j] = torch.tensor(e, dtype=torch.long)


def sample_windows(docs: list[str], tokenizer, nsamples: int, seqlen: int, seed: int,
                   exclude: set[int] | None = None, max_tries: int = 200_000) -> tuple[torch.Tensor, list[int]]:
    """Reference sampler; documents in ``exclude`` are skipped (for disjoint held-out sets)."""
    prefetch.settle(tokenizer)  # the tokenizer is used by one thread at a time
    if nsamples < 1:
        raise UserError(f"nsamples must be at least 1 (got {nsamples})")
    if seqlen < 2:
        raise UserError(f"seqlen must be at least 2 (got {seqlen})")
    rng = random.Random(seed)
    cache: dict[int, torch.Tensor] = {}
    out, ids = [], []
    tries = 0
    exclude = exclude or set()
    for _ in range(nsamples):
        while True:
            tries += 1
            if tries > max_tries:
                raise UserError(f"too few calibration documents longer than {seqlen} tokens: lower --seqlen or use more data")
            i = rng.randint(0, len(docs) - 1)
            if i in exclude:
                continue
            if i not in cache:
                _tokenize_ahead(docs, tokenizer, rng, i, exclude, cache)
            if cache[i].shape[0] > seqlen:
                break
        enc = cache[i]
        j = rng.randint(0, enc.shape[0] - seqlen - 1)
        out.append(enc[j : j + seqlen])
        ids.append(i)
    return torch.stack(out), ids


def sample_c4_windows(tokenizer, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                      source: str = "c4", exclude: set[int] | None = None, data_dir: str | None = None) -> CalibSet:
    """``nsamples`` windows of ``seqlen`` tokens from the calibration documents of ``source``."""
    docs = load_documents(source, calib_split(source), data_dir)
    ids, doc_ids = sample_windows(docs, tokenizer, nsamples, seqlen, seed, exclude)
    return CalibSet(ids, source, seed, doc_ids)



def token_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None,
                  flag: str = "--seqlen") -> torch.Tensor:
    """Tokenise ``text`` once and cut it into non-overlapping ``seqlen`` windows, remainder dropped
    (the reference perplexity protocol; also the SV set and the LoRA training windows). ``flag`` names
    the option that set ``seqlen``, for the error message."""
    if max_windows is not None and max_windows < 1:
        raise UserError(f"the number of windows must be at least 1 (got {max_windows})")
    prefetch.settle(tokenizer)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(f"the text has only {ids.numel()} tokens, fewer than one window of {seqlen}: lower {flag}")
    return ids[: n * seqlen].view(n, seqlen)
