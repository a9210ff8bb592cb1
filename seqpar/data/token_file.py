"""A tokenized dataset on disk, opened as a memmap so a terabyte costs no memory.

A dataset directory holds
  tokens.bin  every document's tokens back to back, uint16, no EOS (packing inserts it)
  index.npy   int64 document offsets into tokens.bin: n_docs + 1 entries, 0 first, n_tokens last
  meta.json   {"format", "version", "vocab_size", "n_docs", "n_tokens", "dtype"}
Make one with `seqpar-prepare FILES --out DIR` (seqpar/data/prepare.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from seqpar.data.tokenizer import VOCAB_SIZE

FORMAT = "seqpar-tokens"
VERSION = 1
DTYPE = np.uint16


def _fix(path: Path) -> str:
    return f"rebuild it with `python -m seqpar.data.prepare FILES --out {path}`"


class TokenFile:
    """Document source over a prepared dataset directory."""

    def __init__(self, path):
        self.path = path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such dataset directory; make one with "
                                    f"`python -m seqpar.data.prepare FILES --out {path}`")
        for name in ("tokens.bin", "index.npy", "meta.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name}: missing, the dataset is incomplete; {_fix(path)}")
        try:
            self.meta = json.loads((path / "meta.json").read_text())
            index = np.load(path / "index.npy", mmap_mode="r")
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: unreadable meta.json or index.npy ({e}); {_fix(path)}") from None
        self._check(index)
        self.index = index
        self.num_docs = len(index) - 1
        self.num_tokens = int(index[-1])
        # np.memmap refuses an empty file; a dataset of empty documents has no token to map
        self.tokens = (np.memmap(path / "tokens.bin", dtype=DTYPE, mode="r") if self.num_tokens
                       else np.zeros(0, dtype=DTYPE))

    def _check(self, index: np.ndarray) -> None:
        path, meta = self.path, self.meta
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{path / 'meta.json'}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                             f"expected {FORMAT!r} version {VERSION}; {_fix(path)}")
        if meta.get("vocab_size") != VOCAB_SIZE:
            raise ValueError(f"{path / 'meta.json'}: vocab_size={meta.get('vocab_size')} but seqpar's byte tokenizer "
                             f"has {VOCAB_SIZE}; {_fix(path)}")
        n_bytes = (path / "tokens.bin").stat().st_size
        itemsize = np.dtype(DTYPE).itemsize
        problem = None
        if index.ndim != 1 or index.dtype != np.int64 or len(index) < 1:
            problem = f"index.npy must be a 1-d int64 array, got {index.dtype} of shape {index.shape}"
        elif n_bytes % itemsize:
            problem = f"tokens.bin has {n_bytes} bytes, not a whole number of {np.dtype(DTYPE).name} tokens"
        elif index[0] != 0 or index[-1] != n_bytes // itemsize:
            problem = (f"index.npy spans [{index[0]}, {index[-1]}) but tokens.bin holds {n_bytes // itemsize} tokens "
                       "(truncated or mismatched files)")
        elif np.any(np.diff(index) < 0):
            problem = "index.npy offsets decrease"
        elif meta.get("n_docs") != len(index) - 1 or meta.get("n_tokens") != int(index[-1]):
            problem = (f"meta.json says n_docs={meta.get('n_docs')}, n_tokens={meta.get('n_tokens')} but the index "
                       f"holds {len(index) - 1} documents and {int(index[-1])} tokens")
        if problem:
            raise ValueError(f"{path}: {problem}; {_fix(path)}")

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.index[i]:self.index[i + 1]]

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.index)
