"""Tokenize text files into a dataset directory that TokenFile opens (`seqpar-prepare`).

`.txt` and `.md` files are one document each; `.jsonl` files hold one document per line, its text
under `--text-key`; empty documents are skipped. A directory argument stands for its supported
files, sorted. The dataset is written into a temporary directory beside `--out` and renamed into
place only when complete, so a crash or a bad input never leaves a half-written dataset behind."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from seqpar.data.token_file import DTYPE, FORMAT, VERSION
from seqpar.data.tokenizer import VOCAB_SIZE, encode

TEXT_SUFFIXES = {".txt", ".md"}
JSONL_SUFFIXES = {".jsonl"}


def expand_inputs(inputs: list[Path]) -> list[Path]:
    files = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES | JSONL_SUFFIXES)
        elif not p.exists():
            raise FileNotFoundError(f"{p}: input not found")
        elif p.suffix not in TEXT_SUFFIXES | JSONL_SUFFIXES:
            raise ValueError(f"{p}: unsupported file type {p.suffix!r}; use .txt or .md (one document per file) "
                             "or .jsonl (one document per line)")
        else:
            files.append(p)
    if not files:
        raise ValueError(f"no .txt, .md or .jsonl files among {[str(p) for p in inputs]}")
    return files


def read_documents(path: Path, text_key: str) -> Iterator[str]:
    if path.suffix in TEXT_SUFFIXES:
        yield path.read_text(encoding="utf-8")
        return
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{line_no}: no string field {text_key!r} (found {keys}); "
                                 "choose the field with --text-key")
            yield record[text_key]


def prepare(inputs: list[Path], out: Path, *, text_key: str = "text", overwrite: bool = False) -> Path:
    """Tokenize `inputs` into the dataset directory `out`; returns `out`."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: already exists; choose another --out or pass --overwrite")
    files = expand_inputs(inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the dataset's permissions
    try:
        offsets = [0]
        with open(tmp / "tokens.bin", "wb") as f:
            for path in files:
                try:
                    for text in read_documents(path, text_key):
                        if not text:
                            continue  # an empty document would only add an EOS
                        tokens = encode(text).astype(DTYPE, copy=False)
                        f.write(tokens.tobytes())
                        offsets.append(offsets[-1] + len(tokens))
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}: not UTF-8 text ({e})") from None
            f.flush()
            os.fsync(f.fileno())
        np.save(tmp / "index.npy", np.array(offsets, dtype=np.int64))
        meta = {"format": FORMAT, "version": VERSION, "vocab_size": VOCAB_SIZE, "n_docs": len(offsets) - 1,
                "n_tokens": offsets[-1], "dtype": np.dtype(DTYPE).name, "sources": [str(p) for p in files]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if out.exists():
            # park the old dataset first: rename cannot replace a non-empty directory
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.replace(old / out.name)
            tmp.replace(out)
            shutil.rmtree(old)
        else:
            tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="seqpar-prepare", description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, metavar="IN", help=".txt/.md/.jsonl files or directories")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument("--text-key", default="text", help="field of each .jsonl record that holds the text")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    args = parser.parse_args(argv)
    try:
        out = prepare(args.inputs, args.out, text_key=args.text_key, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        parser.exit(2, f"seqpar-prepare: error: {e}\n")
    meta = json.loads((out / "meta.json").read_text())
    print(f"wrote {out}: {meta['n_docs']} documents, {meta['n_tokens']} tokens")


if __name__ == "__main__":
    main()
