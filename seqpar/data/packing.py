"""Fixed-length training windows cut from the stream of documents, with their boundaries.

The stream is every document followed by EOS, in order. Window i covers stream tokens
[i*L, i*L + L + 1): inputs are its first L tokens, targets its last L. Windows overlap by the one
token that is both the last target of window i and the first input of window i+1, so every stream
token is predicted exactly once. A document cut by a window edge carries over into the next window.
Only document offsets are kept in memory; a window reads just the documents it touches."""
from __future__ import annotations

import numpy as np

from seqpar.data.documents import doc_lengths
from seqpar.data.tokenizer import EOS_ID

IGNORE_INDEX = -100


class PackedSequences:
    def __init__(self, source, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len}: must be positive")
        self.source = source
        self.seq_len = seq_len
        # starts[j]: where document j begins in the stream; starts[-1]: the stream's length
        self.starts = np.concatenate([[0], np.cumsum(doc_lengths(source) + 1)]).astype(np.int64)
        self.num_tokens = int(self.starts[-1])
        self._len = max(0, (self.num_tokens - 1) // seq_len)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids int64 [L], targets int64 [L], cu_seqlens int32 [n+1]) of window i."""
        if not -self._len <= i < self._len:
            raise IndexError(f"window {i} out of range for {self._len} windows")
        i %= self._len
        L, starts = self.seq_len, self.starts
        lo, hi = i * L, i * L + L + 1
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        last = int(np.searchsorted(starts, hi, side="left"))  # documents [first, last) touch the window
        window = np.empty(L + 1, dtype=np.int64)
        for j in range(first, last):
            a, b = max(starts[j], lo), min(starts[j + 1], hi)  # stream span of document j + its EOS
            tokens = self.source.doc(j)[a - starts[j]:b - starts[j]]
            window[a - lo:a - lo + len(tokens)] = tokens
            if b == starts[j + 1]:
                window[b - 1 - lo] = EOS_ID
        targets = window[1:].copy()
        # an EOS is the last position of a document; its "next token" belongs to another document
        eos = starts[first + 1:last + 1] - 1 - lo
        targets[eos[eos < L]] = IGNORE_INDEX
        inner = starts[first + 1:last] - lo
        cu_seqlens = np.concatenate([[0], inner[inner < L], [L]]).astype(np.int32)
        return window[:L], targets, cu_seqlens
