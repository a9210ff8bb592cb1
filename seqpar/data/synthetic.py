"""Documents of random tokens with a chosen length mix, for benchmarks of packed documents.

What matters to sequence parallelism is where document boundaries fall (attention work grows
with the square of each document's length), not what the tokens say, so the tokens are random
and only the lengths follow a distribution: `fixed`, `uniform`, `lognormal`, or `file` (a JSON
list of real document lengths such as DistCA's prolong.json, resampled; gzipped where it ends in .gz)."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np

DISTRIBUTIONS = ("fixed", "uniform", "lognormal", "file")


def _draw(rng: np.random.Generator, n: int, distribution: str, mean_len: int, sigma: float,
          pool: np.ndarray | None) -> np.ndarray:
    if distribution == "fixed":
        return np.full(n, mean_len, dtype=np.int64)
    if distribution == "uniform":
        return rng.integers(1, 2 * mean_len, size=n, dtype=np.int64)  # [1, 2*mean-1]: mean is mean_len
    if distribution == "lognormal":
        mu = math.log(mean_len) - sigma ** 2 / 2  # E[exp(N(mu, sigma^2))] = exp(mu + sigma^2/2) = mean_len
        return np.maximum(1, np.rint(rng.lognormal(mu, sigma, size=n))).astype(np.int64)
    return rng.choice(pool, size=n, replace=True)


def _read_lengths_file(lengths_file) -> np.ndarray:
    if lengths_file is None:
        raise ValueError("data.distribution=file needs data.lengths_file=PATH (a JSON list of document lengths)")
    path = Path(lengths_file)
    if not path.is_file():
        raise FileNotFoundError(f"data.lengths_file={path}: file not found (a JSON list of document lengths)")
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    pool = np.asarray(json.loads(text))
    if pool.ndim != 1 or pool.size == 0 or not np.issubdtype(pool.dtype, np.number) or pool.min() < 1:
        raise ValueError(f"data.lengths_file={path}: must be a non-empty JSON list of positive integers")
    return pool.astype(np.int64)


def synthetic_lengths(num_tokens: int, distribution: str, *, seed: int, mean_len: int = 1024, sigma: float = 1.0,
                      max_len: int | None = None, lengths_file=None) -> np.ndarray:
    """Document lengths (int64, each >= 1, clipped to max_len) whose sum is at least num_tokens;
    the shortest such prefix of a seeded stream of draws."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"data.distribution={distribution!r}: choose one of {', '.join(DISTRIBUTIONS)}")
    if num_tokens < 1:
        raise ValueError(f"data.num_tokens={num_tokens}: must be positive")
    if mean_len < 1 and distribution != "file":
        raise ValueError(f"data.mean_len={mean_len}: must be at least 1")
    if max_len is not None and max_len < 1:
        raise ValueError(f"data.max_len={max_len}: must be at least 1 (or null for no limit)")
    pool = _read_lengths_file(lengths_file) if distribution == "file" else None
    rng = np.random.default_rng(seed)
    expected = pool.mean() if pool is not None else mean_len
    chunk = max(16, int(1.1 * num_tokens / expected))
    parts, total = [], 0
    while total < num_tokens:  # drawing in chunks keeps the result a prefix of one seeded stream
        part = _draw(rng, chunk, distribution, mean_len, sigma, pool)
        if max_len is not None:
            part = np.minimum(part, max_len)
        parts.append(part)
        total += int(part.sum())
    lengths = np.concatenate(parts)
    n = int(np.searchsorted(np.cumsum(lengths), num_tokens)) + 1
    return lengths[:n]


class SyntheticDocuments:
    """Random tokens in [0, 256) with the given lengths; document i depends only on (seed, i)."""

    def __init__(self, lengths, *, seed: int):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.seed = seed
        self.num_docs = len(self.lengths)

    def doc(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range [0, {self.num_docs})")
        rng = np.random.default_rng((self.seed, i))
        return rng.integers(0, 256, size=int(self.lengths[i]), dtype=np.uint16)

    def doc_lengths(self) -> np.ndarray:
        return self.lengths
