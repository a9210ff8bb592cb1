"""The embedded corpus: Python standard-library sources shipped inside the package.

`python -m seqpar.data.corpus --build` regenerates `corpus/stdlib.xz` from the running
interpreter's standard library. The file is lzma data holding one JSON header line (file names,
byte lengths, Python version) followed by the files' bytes back to back; each file is one
document. (This module and the `corpus/` data folder share a name on purpose: the folder has no
`__init__.py`, and Python's import system prefers the module over such a folder.)
"""
from __future__ import annotations

import argparse
import functools
import json
import lzma
import platform
import sysconfig
from pathlib import Path

import numpy as np

CORPUS_FILE = Path(__file__).with_name("corpus") / "stdlib.xz"
FORMAT = "seqpar-corpus"
VERSION = 1

TARGET_BYTES = 3_000_000
STRIDE = 4  # every fourth file of the sorted list: a spread over the whole library, not just a..d
MAX_FILE_BYTES = 250_000  # keeps out pydoc_data/topics.py, a 750 kB string literal
SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def select_files(stdlib: Path, target_bytes: int = TARGET_BYTES) -> list[Path]:
    """The deterministic subset: sorted relative paths, every STRIDE-th, until target_bytes."""
    candidates = sorted(
        p.relative_to(stdlib) for p in stdlib.rglob("*.py")
        if not SKIP_PARTS.intersection(p.relative_to(stdlib).parts) and 0 < p.stat().st_size <= MAX_FILE_BYTES)
    chosen, total = [], 0
    for rel in candidates[::STRIDE]:
        if total >= target_bytes:
            break
        chosen.append(rel)
        total += (stdlib / rel).stat().st_size
    return chosen


def build(out: Path = CORPUS_FILE, stdlib: Path | None = None) -> Path:
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    names = select_files(stdlib)
    blobs = [(stdlib / n).read_bytes() for n in names]
    header = {"format": FORMAT, "version": VERSION, "python": platform.python_version(),
              "names": [n.as_posix() for n in names], "lengths": [len(b) for b in blobs]}
    payload = json.dumps(header).encode() + b"\n" + b"".join(blobs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    tmp.replace(out)
    # the PSF license lets us redistribute these files only with its text and notice retained
    license_file = stdlib / "LICENSE.txt"
    if license_file.is_file():
        (out.parent / "LICENSE-PSF.txt").write_bytes(license_file.read_bytes())
    return out


@functools.lru_cache(maxsize=1)
def _load(path: Path) -> tuple[dict, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: embedded corpus missing; "
                                "rebuild it with `python -m seqpar.data.corpus --build`")
    payload = lzma.decompress(path.read_bytes())
    head, _, body = payload.partition(b"\n")
    header = json.loads(head)
    if header.get("format") != FORMAT or sum(header["lengths"]) != len(body):
        raise ValueError(f"{path}: not a seqpar corpus or truncated; rebuild it with "
                         "`python -m seqpar.data.corpus --build`")
    tokens = np.frombuffer(body, dtype=np.uint8).astype(np.uint16)
    tokens.flags.writeable = False  # shared by every caller through the cache
    return header, tokens


def load_embedded_corpus() -> list[np.ndarray]:
    """Token arrays, one per standard-library file (read-only views of one cached buffer)."""
    header, tokens = _load(CORPUS_FILE)
    offsets = np.concatenate([[0], np.cumsum(header["lengths"])])
    return [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


class EmbeddedCorpus:
    """The embedded corpus as a document source."""

    def __init__(self):
        header, self._tokens = _load(CORPUS_FILE)
        self.names = header["names"]
        self._offsets = np.concatenate([[0], np.cumsum(header["lengths"], dtype=np.int64)])
        self.num_docs = len(self.names)

    def doc(self, i: int) -> np.ndarray:
        return self._tokens[self._offsets[i]:self._offsets[i + 1]]

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self._offsets)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m seqpar.data.corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--build", action="store_true", help="regenerate the corpus from this Python's stdlib")
    parser.add_argument("--out", type=Path, default=CORPUS_FILE)
    args = parser.parse_args(argv)
    if args.build:
        path = build(args.out)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB compressed)")
    else:
        header, tokens = _load(args.out.resolve())
        print(f"{args.out}: {len(header['names'])} documents, {tokens.size} tokens, from Python {header['python']}")


if __name__ == "__main__":
    main()
