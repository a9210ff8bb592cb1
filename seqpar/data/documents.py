"""The one interface every document source provides, so packing does not care where text lives.

A source has `num_docs`, `doc(i)` (the tokens of document i WITHOUT the EOS) and `doc_lengths()`
(all lengths at once, so packing can build its offsets without touching any token)."""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class DocumentSource(Protocol):
    num_docs: int

    def doc(self, i: int) -> np.ndarray: ...

    def doc_lengths(self) -> np.ndarray: ...


class ArrayDocuments:
    """Documents held in memory as a list of token arrays."""

    def __init__(self, docs: Sequence[np.ndarray]):
        self._docs = list(docs)
        self.num_docs = len(self._docs)

    def doc(self, i: int) -> np.ndarray:
        return self._docs[i]

    def doc_lengths(self) -> np.ndarray:
        return np.array([len(d) for d in self._docs], dtype=np.int64)


def doc_lengths(source) -> np.ndarray:
    """Lengths of every document of `source`, from `doc_lengths()` when it has one."""
    if hasattr(source, "doc_lengths"):
        return np.asarray(source.doc_lengths(), dtype=np.int64)
    return np.array([len(source.doc(i)) for i in range(source.num_docs)], dtype=np.int64)
