"""Byte-level tokenizer: a token is one UTF-8 byte, plus one end-of-document id.

Bytes need no vocabulary file and cover any text, which keeps the embedded corpus, token files
and synthetic data on one id space (and `model.vocab_size=257`)."""
from __future__ import annotations

import numpy as np

VOCAB_SIZE = 257
EOS_ID = 256


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of `text` as uint16 ids (no EOS: packing appends it)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)


def decode(ids) -> str:
    ids = np.asarray(ids).astype(np.int64).ravel()
    ids = ids[ids != EOS_ID]
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise ValueError(f"decode: ids must be bytes 0..255 or EOS_ID={EOS_ID}, got range "
                         f"[{ids.min()}, {ids.max()}]")
    # errors="replace": a window cut by packing can start or end inside a multi-byte character
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
